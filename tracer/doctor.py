"""`acceptrace doctor`: what this kernel offers, found by trying."""

from __future__ import annotations

import gzip
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import headers, hooks, kernel, selection
from .errors import UserError

OK, WARN, FAIL = "ok", "warn", "fail"
STYLE = {OK: "green", WARN: "yellow", FAIL: "red"}


@dataclass
class Check:
    name: str
    status: str
    detail: str


def kconfig(option: str) -> str | None:
    """Value of a kernel config option from /proc/config.gz or /boot; None if unknown."""
    sources = [Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")]
    for src in sources:
        try:
            raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        except OSError:
            continue
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith(f"{option}="):
                return line.split("=", 1)[1]
            if line == f"# {option} is not set":
                return "n"
        return "n"
    return None


def gather() -> tuple[list[Check], bool, str]:
    """Run every check; return them, whether tracing can work, and the backend line."""
    checks: list[Check] = []
    add = checks.append
    add(Check("kernel", OK, f"{platform.release()} ({platform.machine()})"))
    root = os.geteuid() == 0
    add(Check("root", OK if root else FAIL, "yes" if root else "no: run doctor with sudo"))

    from .bpfloader import bcc_version  # noqa: PLC0415

    ver = bcc_version()
    add(Check("BCC", OK if ver else FAIL, ver or "python module not importable (make setup)"))

    btf = None
    try:
        btf = kernel.load_btf()
        add(Check("BTF", OK, str(kernel.btf_path())))
    except UserError as exc:
        add(Check("BTF", FAIL, str(exc)))

    tracefs = kernel.find_tracefs()
    if tracefs is None and root:
        try:
            tracefs, _ = kernel.ensure_tracefs()
            add(Check("tracefs", OK, f"{tracefs} (was not mounted: mounted it)"))
        except UserError as exc:
            add(Check("tracefs", FAIL, str(exc)))
    elif tracefs is None:
        add(Check("tracefs", FAIL, "not mounted (acceptrace mounts it when run as root)"))
    else:
        add(Check("tracefs", OK, str(tracefs)))

    facts: kernel.KernelFacts | None = None
    if btf is not None and tracefs is not None:
        try:
            facts = kernel.compute_facts(tracefs, btf)
            add(Check("BTF offsets", OK, f"{len(facts.defines)} offsets/enum values resolved"))
        except UserError as exc:
            add(Check("BTF offsets", FAIL, str(exc)))
    if facts is not None:
        for hook in hooks.CATALOGUE:
            add(_hook_check(hook, facts))
        why = facts.busy_why
        add(Check("blind-spot counter", OK if not why else WARN,
                  "kallsyms has bpf_prog_active and __per_cpu_offset: extra.softirqs_busy "
                  "is counted" if not why else f"{why}: extra.softirqs_busy will be null"))

    tree = None
    try:
        tree = headers.find_header_tree()
        add(Check("header tree", OK, tree.description))
    except UserError as exc:
        add(Check("header tree", FAIL, str(exc)))

    kp_cfg = kconfig("CONFIG_KPROBES")
    works: list[str] = []
    if root and ver is not None and tree is not None and facts is not None:
        headers.activate(tree)
        prep = selection.Prepared(facts=facts)
        for name in selection.AUTO_ORDER:
            try:
                selection.open_backend(name, prep, dispatch=False).close()
            except UserError as exc:
                extra = f"; CONFIG_KPROBES={kp_cfg}" if name == "kprobe" and kp_cfg else ""
                add(Check(f"{name} backend", WARN, f"{exc}{extra}"))
                continue
            works.append(name)
            add(Check(f"{name} backend", OK, "compiled, loaded and attached, then detached"))
    else:
        add(Check("backends", WARN, "not tried (needs root, BCC, BTF and tracefs)"))
    if works:
        backend = f"{works[0]} (what --backend auto picks; loadable here: {', '.join(works)})"
    else:
        backend = "none: fix the failed checks above"
    return checks, bool(works), backend


WHEN = {"always": "always",
        "busy": "where kallsyms shows the per-CPU busy flags (the blind-spot counter)",
        "unseen": "where kprobes feed the drop counters (extra.packets_unseen)"}


def _hook_check(hook: hooks.Hook, facts: kernel.KernelFacts) -> Check:
    """One catalogue row on this kernel: present (with its signature or fields), or why not."""
    name = f"{hook.kind.replace('_', ' ')} {hook.point}"
    if hook.kind == "raw_tracepoint":
        return Check(name, OK, f"present; attached {WHEN[hook.when]}")
    why = selection.unavailable(hook, facts)
    users = ", ".join(hook.backends)
    if why is None:
        detail = facts.signatures.get(hook.point) or "tracepoint present"
        return Check(name, OK, f"{detail} ({users})")
    needed = [b for b in hook.backends if hook.is_required(b)]
    lost = f"the {', '.join(needed)} backend cannot run" if needed else hook.why
    return Check(name, FAIL if needed == list(hook.backends) else WARN, f"{why}: {lost}")


def server_checks(port: int) -> list[Check]:
    """The processes serving ``port``: event loop, HTTP parser, dispatch traceable?"""
    from . import servers  # noqa: PLC0415

    pids = servers.server_pids(port)
    if not pids:
        return [Check(f"port {port}", WARN, "nothing listens on it (in this network namespace)")]
    out = []
    for pid in pids:
        info = servers.inspect(pid)
        if info.parser == "httptools" and info.parser_path:
            target = servers.find_dispatch_symbol(info.parser_path)
            if target is None:
                status, how = WARN, "dispatch: no usable symbol (stripped?)"
            elif target.exact:
                status, how = OK, f"dispatch: uprobe on {target.symbol} (+{target.file_offset:#x})"
            else:
                status, how = OK, f"dispatch: approximate, uprobe on {target.symbol}"
        elif info.parser == "h11":
            status, how = WARN, "dispatch: not available (h11; use --http httptools)"
        else:
            status, how = WARN, "dispatch: not available (no httptools parser)"
        server = servers.identify(pid)[1]
        out.append(Check(
            f"pid {pid} {info.comm}", status,
            f"server {server.name}"
            + (f" ({server.worker_class})" if server.worker_class else "")
            + f", loop {info.loop or 'n/a'}, parser {info.parser or 'n/a'}; {how}"))
    return out


def run_doctor(out: Console, port: int | None = None) -> int:
    checks, works, backend = gather()
    if port is not None:
        checks += server_checks(port)
    table = Table(title="acceptrace doctor", show_header=True, header_style="bold")
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1)
    for c in checks:
        table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.detail)
    out.print(table)
    out.print(f"[bold]backend:[/] {backend}")
    return 0 if works else 1
