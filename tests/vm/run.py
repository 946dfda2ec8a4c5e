#!/usr/bin/env python3
"""Boot a Debian kernel in QEMU (TCG) and run acceptrace's root tests inside it.

    sudo .venv/bin/python tests/vm/run.py                 # every kernel of MATRIX
    sudo .venv/bin/python tests/vm/run.py --kernel 6.12 --backends tracepoint \\
        --tests tests/test_live_kernel.py --checks -v

The guest boots the cached image of tests/vm/build-rootfs.sh (built first if
needed) with snapshot=on, sees this working tree read-only over virtio-9p (tag
`src`) and writes into a host directory over 9p (tag `results`): per backend a
junit XML, a pytest log and a status line, plus info.txt (uname, BCC, kernel
config), timings and the serial console. tests/test_vm.py drives this module;
docs/vm.md explains it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build-rootfs.sh"

sys.path.insert(0, str(HERE))
from calibrate import MAX_BACKEND_FACTOR  # noqa: E402  (the guest's own cap, one definition)

# The guest test lists: the one place they are defined. Files (or node ids) that
# do not exist (yet) are skipped by the guest.
#
# fentry, the backend production kernels get, runs every guest test on every
# kernel. The other backends share fentry's C bodies (bpf/funcs.bpf.h, bpf/common.bpf.h: one
# body per stage, a few lines of glue per attach type), so on them a test earns
# its ~45 s of TCG (a BCC compile each) only when it makes that backend's own
# glue fire where fentry's does not prove it: each of its hooks against a kernel
# counter, IPv6, concurrency (kretprobe instances), its blind spots, detaching.
GUEST_TESTS = (
    "tests/test_live_kernel.py",
    "tests/test_uvicorn.py",
    "tests/test_drops.py",
    "tests/test_backends.py",
    "tests/test_blind.py",
    # the (namespace, port) filter of the function hooks: two servers on one port
    "tests/test_netns.py::test_namespace_counts_only_its_own_connections",
    # per-target rows: two ports in one run; every listener, one overflowing
    "tests/test_listeners.py::test_two_ports_one_run_each_counts_its_own",
    "tests/test_listeners.py::test_every_listener_ranked_and_a_new_one_picked_up",
    # the kernel's statistics of fentry programs (and their skipped runs, counted)
    "tests/test_cost.py",
    # any server: the first response after the first read (the send hook)
    "tests/test_servers.py::test_read_to_response_known_delay[nginx]",
    "tests/test_servers.py::test_read_to_response_known_delay[gunicorn]",
    "tests/test_servers.py::test_uvicorn_response_is_dispatch_plus_its_two_parts",
)
KPROBE_TESTS = (
    "tests/test_live_kernel.py::test_other_ports_not_counted",            # IPv4 + IPv6 args
    "tests/test_live_kernel.py::test_listen_overflow_matches_kernel_counters",  # SYN drops
    "tests/test_live_kernel.py::test_concurrent_clients_counted_exactly",  # kretprobe maxactive
    "tests/test_live_kernel.py::test_final_ack_overflow_is_told_apart",    # tcp_v4_syn_recv_sock
    "tests/test_drops.py::test_syn_queue_flood_with_syncookies",           # cookie_v4_init_sequence
    "tests/test_drops.py::test_syncookie_connection_gets_a_handshake_time",  # reqsk_queue_add
    # accept, read, send, dispatch
    "tests/test_uvicorn.py::test_uvicorn_requests_counted_and_attributed[uvloop]",
    "tests/test_backends.py::test_backend_detaches_and_reports_its_hooks",
    "tests/test_blind.py",                                                 # kprobes' blind spot
    "tests/test_netns.py::test_namespace_counts_only_its_own_connections[netns]",  # filter
    # per-target rows through the kprobe glue (SYN drops, final ACKs, accept, read)
    "tests/test_listeners.py::test_two_ports_one_run_each_counts_its_own",
    "tests/test_listeners.py::test_every_listener_ranked_and_a_new_one_picked_up",
    # the send hook's glue (tcp_sendmsg kprobes where sock:sock_send_length is missing)
    "tests/test_servers.py::test_read_to_response_known_delay[gunicorn]",
)
# The tracepoint backend runs every test on the host (6.18); 6.12 is its kernel
# before 6.15, whose skb:kfree_skb cannot tell final-ACK drops apart, and whose
# tracepoint formats are older.
TRACEPOINT_TESTS = (
    "tests/test_live_kernel.py::test_other_ports_not_counted",
    "tests/test_live_kernel.py::test_listen_overflow_matches_kernel_counters",  # split: null
    "tests/test_drops.py::test_syn_queue_flood_without_syncookies",
    "tests/test_drops.py::test_syncookie_connection_gets_a_handshake_time",
    "tests/test_uvicorn.py::test_uvicorn_requests_counted_and_attributed[asyncio]",
    "tests/test_backends.py::test_backend_detaches_and_reports_its_hooks",
)
# The lab's scenarios on the fentry backend (issue 15), stretched to the guest's speed
# (tracer/lab.py stretch_load).  Each runs in one fentry cell; they are split over the two
# kernels' fentry cells so that the matrix's two rows, which run side by side, take about
# as long (docs/vm.md; 6.12's row has the tracepoint cell besides).  Seconds measured in a
# quiet guest (a busy one: up to 1.6 times): syn-flood 72, workers 136, accept-overflow
# 83, somaxconn-clamp 76 | abort-on-overflow 90, event-loop-busy 83.
LAB_TESTS: dict[str, tuple[str, ...]] = {
    "6.1": ("tests/test_lab.py::test_syn_flood",
            "tests/test_lab.py::test_workers",
            "tests/test_lab.py::test_accept_overflow",
            "tests/test_lab.py::test_somaxconn_clamp"),
    "6.12": ("tests/test_lab.py::test_abort_on_overflow",
             "tests/test_lab.py::test_event_loop_busy"),
}
# Seconds added to the cell's timeout: about twice the busy figures above.
LAB_TIMEOUT: dict[str, int] = {"6.1": 1100, "6.12": 550}
BACKEND_TESTS: dict[str, tuple[str, ...]] = {
    "fentry": GUEST_TESTS, "kprobe": KPROBE_TESTS, "tracepoint": TRACEPOINT_TESTS,
}
# Seconds per backend on a quiet machine (about twice what its tests took there,
# docs/vm.md); the guest multiplies it by its calibrated backend_factor
# (1..MAX_BACKEND_FACTOR, tests/vm/calibrate.py).
BACKEND_TIMEOUTS: dict[str, int] = {"fentry": 1700, "kprobe": 1100, "tracepoint": 600}
ALL_BACKENDS = ("fentry", "kprobe", "tracepoint")


@dataclass(frozen=True)
class KernelPlan:
    """What one guest kernel runs. `label` is the kernel series ("6.1"); the
    image's kernel whose release starts with "<label>." is booted."""

    label: str
    backends: tuple[str, ...]
    # Hooks tests/vm/hook_checks.py must find attachable (with --checks).
    hooks: tuple[str, ...] = ()
    # More tests for one backend on this kernel only: (backend, tests, seconds they add)
    extra: tuple[tuple[str, tuple[str, ...], int], ...] = ()

    def tests(self, backend: str) -> tuple[str, ...]:
        more = tuple(t for b, tests, _ in self.extra if b == backend for t in tests)
        return BACKEND_TESTS.get(backend, GUEST_TESTS) + more

    def timeout(self, backend: str) -> int:
        more = sum(s for b, _, s in self.extra if b == backend)
        return BACKEND_TIMEOUTS.get(backend, max(BACKEND_TIMEOUTS.values())) + more


# The matrix: one row per guest kernel. Edit here to trade coverage for time
# (docs/vm.md has the measured cost of each cell).
HOOKS = ("kprobe:tcp_conn_request", "kretprobe:inet_csk_accept", "fentry:tcp_conn_request",
         "fexit:inet_csk_accept", "raw_tracepoint:inet_sock_set_state")
MATRIX: dict[str, KernelPlan] = {
    # bookworm's own kernel (linux-image-amd64): kprobes and fentry, but no
    # sk_data_ready / sock_recv_length tracepoints, so no tracepoint backend (6.3+).
    "6.1": KernelPlan("6.1", backends=("fentry", "kprobe"), hooks=HOOKS,
                      extra=(("fentry", LAB_TESTS["6.1"], LAB_TIMEOUT["6.1"]),)),
    # bookworm's 6.12 (linux-image-6.12.*+deb12-amd64-unsigned): all three.
    "6.12": KernelPlan("6.12", backends=("fentry", "kprobe", "tracepoint"),
                       hooks=HOOKS + ("raw_tracepoint:sk_data_ready",),
                       extra=(("fentry", LAB_TESTS["6.12"], LAB_TIMEOUT["6.12"]),)),
}

BOOT_ALLOWANCE = 300      # boot + copy + install, seconds (measured: 25-40)
CHECKS_TIMEOUT = 180      # hook_checks.py (measured: 15-35)
QEMU = os.environ.get("ACCEPTRACE_VM_QEMU", "qemu-system-x86_64")
# One host thread runs both vCPUs of a guest (docs/vm.md, "One TCG thread per guest"):
# multi-threaded TCG ran stale translations of kernel text the guest had just patched
# (three times: a boot Oops, an int3 Oops in handle_softirqs, and a soft lockup of both
# vCPUs while fentry programs were detached).  ACCEPTRACE_VM_TCG_THREAD=multi to compare.
TCG_THREAD = os.environ.get("ACCEPTRACE_VM_TCG_THREAD", "single")
if TCG_THREAD not in ("single", "multi"):
    raise SystemExit(f"ACCEPTRACE_VM_TCG_THREAD must be single or multi, not {TCG_THREAD!r}")


class GuestError(RuntimeError):
    """The guest did not finish (timeout, crash, install failure). `result` has
    what it wrote before that (backends that completed), when it booted at all."""

    def __init__(self, message: str, result: GuestResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class Case:
    name: str            # file::test[param]
    outcome: str         # passed, failed, error, skipped
    seconds: float
    message: str = ""


@dataclass
class BackendResult:
    backend: str
    rc: int | None              # pytest's exit status in the guest (124: timeout)
    seconds: float | None
    timeout: int | None         # the backend's timeout, as the guest calibrated it
    scale: float | None         # the guest's time scale for this backend
    cases: list[Case]
    log: Path
    junit: Path

    def by_outcome(self, *outcomes: str) -> list[Case]:
        return [c for c in self.cases if c.outcome in outcomes]


@dataclass
class GuestResult:
    label: str
    release: str
    results_dir: Path
    seconds: float                      # QEMU wall time
    timings: dict[str, float]           # guest uptime stamps (init_start, installed, ...)
    backends: dict[str, BackendResult] = field(default_factory=dict)

    @property
    def console(self) -> Path:
        return self.results_dir / "console.log"

    def text(self, name: str) -> str:
        p = self.results_dir / name
        return p.read_text(errors="replace") if p.exists() else ""

    def console_tail(self, n: int = 40) -> str:
        return tail(self.console, n)


def tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} missing)"
    return "\n".join(lines[-n:])


# Set to stop every guest now (pytest interrupted): run_guest kills its QEMU.
CANCEL = threading.Event()
# Where progress goes (None: sys.stderr). tests/test_vm.py points it at the
# terminal, past pytest's capture, since its guests run in threads.
OUT: TextIO | None = None
_out_lock = threading.Lock()


def _emit(text: str) -> None:
    with _out_lock:
        out = OUT or sys.stderr
        out.write(text)
        out.flush()


def log(msg: str) -> None:
    _emit(f"[vm {time.strftime('%H:%M:%S')}] {msg}\n")


def missing_tools() -> list[str]:
    need = {QEMU: "qemu-system-x86", "debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs"}
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [pkg for tool, pkg in need.items() if not shutil.which(tool, path=path)]


def build_rootfs(quiet: bool = False) -> Path:
    """The image directory, built by build-rootfs.sh when its key changed."""
    env = dict(os.environ)
    env.setdefault("ACCEPTRACE_VM_PIP", f"{shlex.quote(sys.executable)} -m pip")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if quiet else None, text=True)
    if proc.returncode != 0:
        raise GuestError(f"build-rootfs.sh failed (exit {proc.returncode})\n"
                         + (proc.stderr or "")[-4000:])
    d = Path(proc.stdout.strip().splitlines()[-1])
    if time.monotonic() - t0 > 5:
        log(f"rootfs ready in {time.monotonic() - t0:.0f} s: {d}")
    return d


def kernel_release(image_dir: Path, label: str) -> str:
    rels = (image_dir / "kernels").read_text().split()
    found = [r for r in rels if r.startswith(label + ".")]
    if not found:
        raise GuestError(f"no {label} kernel in {image_dir} (has: {', '.join(rels)})")
    return sorted(found)[-1]


def parse_junit(path: Path) -> list[Case]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        cls = tc.get("classname", "")
        name = f"{cls.replace('.', '/')}.py::{tc.get('name')}" if cls else tc.get("name", "?")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (el.get("message") or "").strip()
                if tag != "skipped" and el.text:
                    # the assertion's last lines say more than pytest's one-line message
                    message = (message + "\n" + "\n".join(el.text.strip().splitlines()[-12:]))
                if tag != "skipped":
                    # and a compiler's "error:" lines (BCC prints them to stderr) more still
                    err = tc.findtext("system-err") or ""
                    errors = [ln for ln in err.splitlines() if "error:" in ln]
                    if errors:
                        message += "\ncaptured stderr:\n" + "\n".join(errors[:6])
                break
        cases.append(Case(name, outcome, float(tc.get("time") or 0), message))
    return cases


def qemu_argv(image_dir: Path, release: str, results: Path) -> list[str]:
    append = " ".join([
        "console=ttyS0", "root=/dev/vda", "rw", "init=/sbin/acceptrace-vm-init",
        "panic=-1", "fsck.mode=skip", "mitigations=off", "tsc=reliable",
        "random.trust_cpu=on", "loglevel=4", "net.ifnames=0",
    ])
    return [
        QEMU, "-accel", f"tcg,thread={TCG_THREAD}", "-cpu", "max", "-smp", "2", "-m", "4G",
        "-nographic", "-no-reboot", "-snapshot",
        "-kernel", str(image_dir / f"vmlinuz-{release}"),
        "-initrd", str(image_dir / f"initrd.img-{release}"),
        "-append", append,
        "-drive", f"file={image_dir / 'rootfs.ext4'},format=raw,if=virtio,snapshot=on",
        "-fsdev", f"local,id=src,path={REPO},security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=src,mount_tag=src",
        "-fsdev", f"local,id=res,path={results},security_model=none",
        "-device", "virtio-9p-pci,fsdev=res,mount_tag=results",
        "-device", "virtio-rng-pci",
        "-nic", "none",
        "-serial", f"file:{results / 'console.log'}",
        "-monitor", "none",
    ]


def guest_timeout(backend_timeouts: list[int], checks: bool) -> float:
    """The longest a guest may take before the runner kills it: each backend's
    calibrated timeout at the largest factor, plus its calibration."""
    return (BOOT_ALLOWANCE + (CHECKS_TIMEOUT + 20 if checks else 0)
            + sum(t * MAX_BACKEND_FACTOR + 90 for t in backend_timeouts) + 30)


def run_guest(label: str, backends: tuple[str, ...] | None = None,
              tests: tuple[str, ...] | None = None, checks: bool = False,
              results_dir: Path | None = None, timeout: float | None = None,
              backend_timeout: int | None = None, pytest_extra: str = "",
              image_dir: Path | None = None, echo: str | None = None) -> GuestResult:
    """Boot the `label` kernel once, run `backends` (default: MATRIX), return the results.

    echo: None, "progress" (the guest init's lines) or "all" (the whole serial
    console) copied to stderr as it comes. Raises GuestError when the guest
    does not finish (the message ends with the tail of the serial console)."""
    plan = MATRIX.get(label) or KernelPlan(label, backends=ALL_BACKENDS)
    backends = tuple(backends if backends is not None else plan.backends)
    per_backend = {b: tuple(tests) if tests is not None else plan.tests(b) for b in backends}
    timeouts = {b: backend_timeout or plan.timeout(b) for b in backends}
    if timeout is None:
        timeout = guest_timeout(list(timeouts.values()), checks)
    image_dir = image_dir or build_rootfs()
    release = kernel_release(image_dir, label)
    if results_dir is None:
        results_dir = Path(tempfile.mkdtemp(prefix=f"acceptrace-vm-{label}-"))
    results_dir.mkdir(parents=True, exist_ok=True)
    for pattern in ("done", "failed", "timings", "info.txt", "install.log", "console.log",
                    "qemu.log", f"{label}-*.xml", f"{label}-*.log", f"{label}-*.status",
                    f"{label}-*.starts"):
        for old in results_dir.glob(pattern):   # a reused --results directory
            old.unlink()
    (results_dir / "config.sh").write_text("".join(
        f"{k}={shlex.quote(str(v))}\n" for k, v in {
            "LABEL": label, "BACKENDS": " ".join(backends),
            **{f"TESTS_{b}": " ".join(t) for b, t in per_backend.items()},
            **{f"TIMEOUT_{b}": t for b, t in timeouts.items()},
            "CHECKS": int(checks),
            "CHECKS_TIMEOUT": CHECKS_TIMEOUT,
            "PYTEST_EXTRA": pytest_extra,
        }.items()))
    argv = qemu_argv(image_dir, release, results_dir)
    (results_dir / "qemu.argv").write_text(shlex.join(argv) + "\n")
    log(f"booting {release} (backends: {' '.join(backends) or 'none'}; "
        f"timeout {timeout:.0f} s; results in {results_dir})")
    t0 = time.monotonic()
    for attempt in range(1, BOOT_ATTEMPTS + 1):
        proc, timed_out = _boot_and_wait(argv, results_dir, t0 + timeout, echo, label)
        if timed_out or (results_dir / "done").exists() or not _died_booting(results_dir):
            break
        # The kernel died before the guest's init said a word: not acceptrace's doing
        # (seen: an int3 Oops in sched_clock_cpu at 5 s, multi-threaded TCG running a
        # stale translation of text the kernel live-patched at boot).  Boot again.
        console = results_dir / "console.log"
        console.rename(results_dir / f"console-boot{attempt}.log")
        log(f"{release} guest died while booting (attempt {attempt} of {BOOT_ATTEMPTS}: "
            f"{_panic_line(results_dir / f'console-boot{attempt}.log')}); booting again")
    elapsed = time.monotonic() - t0
    result = GuestResult(label, release, results_dir, elapsed, _timings(results_dir))
    for b in backends:
        result.backends[b] = _backend_result(results_dir, label, b)
    if timed_out:
        raise GuestError(f"{release} guest did not finish within {timeout:.0f} s "
                         f"(QEMU killed); results in {results_dir}; console tail:\n"
                         + result.console_tail(), result)
    if not (results_dir / "done").exists():
        raise GuestError(f"{release} guest stopped before the end (QEMU exit {proc.returncode}); "
                         f"results in {results_dir}; console tail:\n" + result.console_tail()
                         + ("\ninstall.log tail:\n" + tail(results_dir / "install.log", 20)
                            if (results_dir / "failed").exists() else ""), result)
    log(f"{release} guest done in {elapsed:.0f} s")
    return result


BOOT_ATTEMPTS = 2


def _boot_and_wait(argv: list[str], results_dir: Path, deadline: float, echo: str | None,
                   label: str) -> tuple[subprocess.Popen, bool]:
    """Run QEMU until it exits or ``deadline``; (the process, whether it timed out)."""
    with open(results_dir / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    timed_out = False
    shown = 0
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline or CANCEL.is_set():
                timed_out = True
                break
            if echo:
                shown = _echo_console(results_dir / "console.log", shown, echo, label=label)
            time.sleep(1)
    finally:
        if proc.poll() is None:
            _kill(proc)
        if echo:
            _echo_console(results_dir / "console.log", shown, echo, final=True, label=label)
    return proc, timed_out


def _died_booting(results_dir: Path) -> bool:
    """The guest kernel panicked before its init printed anything (no test ran)."""
    try:
        text = (results_dir / "console.log").read_text(errors="replace")
    except OSError:
        return False
    return "Kernel panic" in text and "acceptrace-vm:" not in text


def _panic_line(console: Path) -> str:
    try:
        lines = console.read_text(errors="replace").splitlines()
    except OSError:
        return "no console"
    found = [ln.strip() for ln in lines if any(w in ln for w in KERNEL_COMPLAINTS)]
    return "; ".join(found[:3]) or "no panic line"


# What a guest kernel says on its console when it is in trouble (a timed-out backend
# quotes them: a soft lockup is the emulator's or the kernel's, not a slow test).
KERNEL_COMPLAINTS = ("Oops", "Kernel panic", "RIP:", "soft lockup", "detected stalls",
                     "hung_task", "blocked for more than")


def kernel_complaints(console: Path) -> str:
    """The first few trouble lines of a guest's serial console, or ''."""
    line = _panic_line(console)
    return "" if line in ("no console", "no panic line") else line


_PRCTL: Callable[..., int] | None
try:  # looked up before any fork: the child of a threaded parent must not import
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None


def _die_with_parent() -> None:
    """In the QEMU child: SIGKILL when the thread that started it ends (the
    runner killed by CI, or its guest thread gone), so no guest outlives it."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _echo_console(path: Path, shown: int, echo: str, final: bool = False,
                  label: str = "") -> int:
    """Copy the console's new complete lines to stderr: all of them ("all") or
    only the guest init's progress lines ("progress"). Returns the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(shown)
            data = f.read()
    except OSError:
        return shown
    if not final:
        data = data[:data.rfind(b"\n") + 1]
    text = data.decode(errors="replace")
    if echo == "progress":
        text = "".join(f"[vm {label + ' ' if label else ''}{time.strftime('%H:%M:%S')}] {ln}\n"
                       for ln in text.splitlines() if ln.startswith("acceptrace-vm:"))
    if text:
        _emit(text)
    return shown + len(data)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _timings(results: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    p = results / "timings"
    if p.exists():
        for line in p.read_text().splitlines():
            k, _, v = line.partition("=")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def _backend_result(results: Path, label: str, backend: str) -> BackendResult:
    junit = results / f"{label}-{backend}.xml"
    status = results / f"{label}-{backend}.status"
    rc = seconds = timeout = scale = None
    if status.exists():
        text = status.read_text()
        m = re.search(r"rc=(\d+) seconds=([\d.]+)", text)
        if m:
            rc, seconds = int(m.group(1)), float(m.group(2))
        m = re.search(r"timeout=(\d+) scale=([\d.]+)", text)
        if m:
            timeout, scale = int(m.group(1)), float(m.group(2))
    try:
        cases = parse_junit(junit) if junit.exists() and junit.stat().st_size else []
    except ET.ParseError:   # killed while writing it
        cases = []
    return BackendResult(backend, rc, seconds, timeout, scale, cases,
                         results / f"{label}-{backend}.log", junit)


def hook_checks(res: GuestResult) -> dict[str, tuple[bool, str]]:
    """hook_checks.py's verdicts in this guest: name -> (ok, detail); {} if not run."""
    out = {}
    for line in res.text(f"{res.label}-checks.log").splitlines():
        m = re.match(r"(OK|FAIL) +(\S+): (.*)", line)
        if m:
            out[m.group(2)] = (m.group(1) == "OK", m.group(3))
    return out


def start_summary(text: str) -> str:
    """One line on the acceptrace starts of a backend's tests (their "started in"
    lines, conftest's ACCEPTRACE_TEST_START_LOG): how many, median, the slowest."""
    starts = []
    for line in text.splitlines():
        m = re.match(r"(.*?): started in ([0-9.]+) s(.*)", line)
        if m:
            starts.append((float(m.group(2)), m.group(1), m.group(3).strip()))
    if not starts:
        return ""
    starts.sort()
    slow = starts[-1]
    return (f"acceptrace starts: {len(starts)}, median {starts[len(starts) // 2][0]:.1f} s, "
            f"slowest {slow[0]:.1f} s {slow[2]} in {slow[1]}")


def summary(res: GuestResult) -> str:
    t = res.timings
    lines = [f"== {res.release}: QEMU {res.seconds:.0f} s; boot to init "
             f"{t.get('init_start', float('nan')):.1f} s, copy "
             f"{t.get('copied', 0) - t.get('init_start', 0):.1f} s, install "
             f"{t.get('installed', 0) - t.get('copied', 0):.1f} s"]
    for name, (ok, detail) in hook_checks(res).items():
        lines.append(f"   hook {'OK  ' if ok else 'FAIL'} {name}: {detail}")
    for b, br in res.backends.items():
        counts = {o: len(br.by_outcome(o)) for o in ("passed", "failed", "error", "skipped")}
        lines.append(f"   {b:<10} rc={br.rc} {br.seconds or 0:7.1f} s  "
                     + " ".join(f"{k}={v}" for k, v in counts.items())
                     + f"  (timeout {br.timeout} s, time scale {br.scale})")
        starts = start_summary(res.text(f"{res.label}-{b}.starts"))
        if starts:
            lines.append(f"      {starts}")
        for c in br.cases:
            lines.append(f"      {c.outcome:<7} {c.seconds:6.1f} s  {c.name}"
                         + (f"  -- {c.message.splitlines()[0]}" if c.message
                            and c.outcome != "passed" else ""))
    return "\n".join(lines)


def split(s: str) -> tuple[str, ...]:
    return tuple(x for x in re.split(r"[\s,]+", s) if x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", action="append", choices=sorted(MATRIX),
                    help="a row of MATRIX (repeatable; default: all)")
    ap.add_argument("--backends", help="space/comma separated (default: the MATRIX row's)")
    ap.add_argument("--tests", help="space separated test paths or node ids, for every "
                    "backend (default: BACKEND_TESTS)")
    ap.add_argument("--checks", action="store_true",
                    help="also run tests/vm/hook_checks.py (kprobe/fentry/tracepoint attach)")
    ap.add_argument("--results", type=Path, help="results directory (default: a new tmpdir)")
    ap.add_argument("--timeout", type=float, help="overall timeout per guest, seconds")
    ap.add_argument("--backend-timeout", type=int, help="per-backend timeout, seconds")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments in the guest")
    ap.add_argument("--build-only", action="store_true", help="build the rootfs and stop")
    ap.add_argument("-v", "--verbose", action="store_true", help="echo the serial console")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("tests/vm/run.py: needs root (debootstrap, 9p passthrough)", file=sys.stderr)
        return 2
    if missing_tools():
        print("tests/vm/run.py: missing packages: " + " ".join(missing_tools())
              + " (make test-vm installs them)", file=sys.stderr)
        return 2
    image_dir = build_rootfs()
    if a.build_only:
        print(image_dir)
        return 0
    bad = 0
    for label in a.kernel or list(MATRIX):
        results = a.results / label if a.results else None
        try:
            res = run_guest(label, backends=split(a.backends) if a.backends else None,
                            tests=split(a.tests) if a.tests else None, checks=a.checks,
                            results_dir=results, timeout=a.timeout,
                            backend_timeout=a.backend_timeout, pytest_extra=a.pytest_args,
                            image_dir=image_dir, echo="all" if a.verbose else "progress")
        except GuestError as e:
            print(f"== {label}: {e}", file=sys.stderr)
            bad += 1
            continue
        print(summary(res))
        print(f"   results: {res.results_dir}")
        for br in res.backends.values():
            if br.rc != 0 or br.by_outcome("failed", "error") or not br.by_outcome("passed"):
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
