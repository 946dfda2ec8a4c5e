"""Renderers: take a Run (or one of its intervals) and return output; no I/O."""

from __future__ import annotations

import io
from collections.abc import Collection
from datetime import datetime, timedelta

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import listeners
from .diagnose import diagnose
from .hist import Histogram
from .model import Cost, Interval, Meta, Run
from .words import (
    COUNTER_FOR_DROP,
    DROP_MEANING,
    SHORT_STAGE,
    STAGE_MEANING,
    fmt_compact_us,
    fmt_count,
    fmt_server,
    fmt_us,
)


def _stage_table(run: Run) -> Table:
    t = Table(title="stages", title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("stage", no_wrap=True)
    for col in ("count", "min", "p50", "p90", "p99", "p99.9", "max", "mean"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, h in run.stages.items():
        if h is None:
            continue  # not observable here: meta.notes says why
        t.add_row(
            name, fmt_count(h.count), fmt_us(h.min), fmt_us(h.percentile(0.5)),
            fmt_us(h.percentile(0.9)), fmt_us(h.percentile(0.99)), fmt_us(h.percentile(0.999)),
            fmt_us(h.max), fmt_us(h.mean),
        )
    return t


def _depth(h: Histogram | None) -> str:
    if h is None:
        return "n/a"
    if not h.count:
        return "no enqueues"

    def n(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f}"

    return f"p50 {n(h.percentile(0.5))}  p99 {n(h.percentile(0.99))}  max {n(h.max)}"


def _queues_table(run: Run) -> Table:
    q = run.queues
    t = Table(title="queues", title_justify="left", show_edge=False, show_header=False)
    t.add_column("k")
    t.add_column("v")
    backlog = "n/a" if q.backlog is None else str(q.backlog)
    full = ""
    if q.backlog is not None and q.accept_queue_depth and q.accept_queue_depth.max is not None:
        if q.accept_queue_depth.max > q.backlog:
            full = "  [red]FULL: overflowed[/]"
    t.add_row("backlog (accept-queue limit)", backlog)
    t.add_row("accept-queue depth at enqueue", _depth(q.accept_queue_depth) + full)
    t.add_row("SYN-queue length at enqueue", _depth(q.syn_queue_depth))
    for lst in q.listeners:
        addr = f"[{lst.address}]" if lst.family == "ipv6" else lst.address
        peak = f", peak {lst.max_depth}" if lst.max_depth is not None else ""
        t.add_row(f"listener {addr}:{lst.port}" + (f" (ino {lst.inode})"
                                                    if lst.inode and len(q.listeners) > 1 else ""),
                  f"backlog {lst.backlog if lst.backlog is not None else 'n/a'}{peak}")
    return t


def _drops_table(run: Run) -> Table:
    t = Table(title="drops (this port; kernel counters: whole network namespace)",
              title_justify="left", show_edge=False)
    t.add_column("drop", no_wrap=True)
    t.add_column("count", justify="right", no_wrap=True)
    t.add_column("kernel Δ", no_wrap=True)
    t.add_column("meaning", style="dim", ratio=1)
    for name, v in run.drops.items():
        counter = COUNTER_FOR_DROP.get(name)
        kc = ""
        if counter and counter in run.kernel_counters:
            kc = f"{counter.removeprefix('TcpExt')} {run.kernel_counters[counter]:,}"
        style = "red" if v and name != "synack_retransmits" else ""
        t.add_row(name, Text(fmt_count(v), style=style), kc, DROP_MEANING.get(name, ""))
    return t


def _other_counters(run: Run) -> Text:
    shown = set(COUNTER_FOR_DROP.values())
    rest = [f"{k.removeprefix('TcpExt')} {v:,}" for k, v in run.kernel_counters.items()
            if k not in shown]
    return Text("other kernel counters Δ: " + ", ".join(rest), style="dim")


def _procs_table(run: Run) -> Table:
    t = Table(title="accepting processes", title_justify="left", show_edge=False)
    t.add_column("pid", justify="right")
    t.add_column("comm")
    t.add_column("server")
    t.add_column("accepted", justify="right")
    for p in run.processes[:20]:
        t.add_row(str(p.pid), Text(p.comm), Text(fmt_server(p.server, p.worker_class)),
                  f"{p.accepted:,}")
    if not run.processes:
        t.add_row("-", "(no accept() on this port)", "", "0")
    return t


def _addr(family: str, a: str, port: int) -> str:
    return f"[{a}]:{port}" if family == "ipv6" else f"{a}:{port}"


def _slowest_table(run: Run, limit: int = 10) -> Table:
    t = Table(title="slowest connections (total: SYN → last step seen)", title_justify="left",
              show_edge=False)
    dispatch = any(s.read_to_dispatch_us is not None for s in run.slowest)
    # syn→acc (= handshake + accept_q) makes room for the steps after the read.
    cols = ["client", "pid", "handshake", "accept_q", "acc→read", "read→disp", "disp→resp"] \
        if dispatch else ["client", "pid", "handshake", "accept_q", "acc→read", "read→resp"]
    for col in (*cols, "total", "notes"):
        t.add_column(col, justify="left" if col in ("client", "notes") else "right",
                     no_wrap=col != "notes")
    for s in run.slowest[:limit]:
        notes = []
        if s.syncookie:
            notes.append("syncookie")
        if s.synack_retransmits:
            notes.append(f"{s.synack_retransmits} SYN-ACK rtx")
        if s.syn_retransmits:
            notes.append(f"first SYN dropped: {s.syn_retransmits} SYN rtx, "
                         f"+{fmt_us(s.syn_retry_us)}")
        cells = [_addr(s.family, s.saddr, s.sport), str(s.pid) if s.pid else "-",
                 fmt_us(s.handshake_us), fmt_us(s.accept_queue_us)]
        if dispatch:
            cells += [fmt_us(s.accept_to_read_us), fmt_us(s.read_to_dispatch_us),
                      fmt_us(s.dispatch_to_response_us)]
        else:
            cells += [fmt_us(s.accept_to_read_us), fmt_us(s.read_to_response_us)]
        t.add_row(*cells, fmt_us(s.total_us), ", ".join(notes))
    return t


def _rate_cell(v: float | None, alarm: bool = True) -> Text:
    if v is None:
        return Text("n/a", style="dim")
    text = f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
    return Text(text, style="bold red" if alarm and v > 0 else "")


def render_listener_table(run: Run, window: str = listeners.RUN,
                          cursor: int | None = None, limit: int | None = None) -> Table:
    """The run's listeners, worst first; ``cursor``: the row the dashboard selects."""
    per = "now" if window == listeners.NOW else "over the run"
    t = Table(title=f"listeners, worst first (rates per second {per})", title_justify="left",
              show_edge=False, pad_edge=False)
    rows = listeners.table(run, window)
    widest = max((len(r.address) + (0 if r.listening else 7) for r in rows), default=6)
    t.add_column("#", justify="right", no_wrap=True)
    t.add_column("namespace", no_wrap=True, max_width=22)
    t.add_column("listen", no_wrap=True, min_width=widest)
    t.add_column("processes", no_wrap=True, max_width=16)
    for col in ("backlog", "depth now/max", "overflows/s", "SYNq drops/s", "acceptq p99",
                "conn/s"):
        t.add_column(col, justify="right", no_wrap=True)
    for i, r in enumerate(rows[:limit] if limit else rows):
        depth = f"{fmt_count(r.depth_now)}/{fmt_count(r.depth_max)}"
        style = "reverse" if cursor == i else ("dim" if not r.listening else "")
        t.add_row(str(i + 1), r.namespace, r.address + ("" if r.listening else " (gone)"),
                  r.processes, fmt_count(r.backlog), depth, _rate_cell(r.overflows_s),
                  _rate_cell(r.synq_drops_s), fmt_us(r.aq_p99_us),
                  _rate_cell(r.conn_s, alarm=False), style=style)
    return t


def _what(m: Meta) -> str:
    if m.all_listeners:
        return "every listener" + (" of every namespace" if m.all_namespaces else "")
    if len(m.ports) > 1:
        return "ports " + ", ".join(map(str, m.ports))
    return f"port {m.port}"


def fmt_ns(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f} ns" if v < 10_000 else f"{v / 1000:,.1f} µs"


def cost_line(cost: Cost) -> str:
    """What tracing cost, in one line (the dashboard's, the summary's first)."""
    user = cost.user_cpu_pct
    mine = (f"acceptrace {user:.1f} % of a CPU, {cost.peak_rss_kib / 1024:.0f} MiB peak"
            if user is not None else "")
    if cost.stats is None:
        return f"cost: {mine}; in-kernel cost not measured ({cost.why})"
    k = cost.kernel_cpu_pct
    per = cost.kernel_ns_per_connection
    ev = cost.events_per_connection
    if cost.timed_seconds == 0:
        line = "cost: BPF not timed yet (--cost-every)"
    elif per is not None and ev is not None:
        line = f"cost: BPF {fmt_ns(per)} per connection ({ev:.1f} program runs each)"
    else:
        line = "cost: BPF (no connection yet)"
    line += f", {k:.2f} % of a CPU in the kernel; {mine}" if k is not None else f"; {mine}"
    if cost.timed_seconds and cost.timed_seconds < cost.seconds:
        line += f" [BPF timed {cost.timed_seconds:,.0f} s of {cost.seconds:,.0f} s]"
    if cost.virtual_machine:
        line += " [a virtual machine: includes the hypervisor's overhead]"
    return line


def missed_lines(cost: Cost) -> list[str]:
    """One line per program the kernel skipped runs of, and what that does to the figures."""
    out = []
    for p in cost.programs:
        if p.missed:
            feeds = ", ".join(p.feeds) if p.feeds else "no count of its own"
            out.append(f"the kernel skipped {p.missed:,} runs of {p.hook} "
                       f"(of {p.runs + p.missed:,}): {feeds} may be short by up to "
                       f"{p.missed:,}")
    uncounted = [p.hook for p in cost.programs if p.missed is None]
    if uncounted and cost.stats is not None:
        out.append("runs the kernel skipped are not counted for "
                   + ", ".join(uncounted) + " on this kernel (docs/backends.md)")
    return out


def render_cost(cost: Cost) -> RenderableType:
    parts: list[RenderableType] = [Text(cost_line(cost), style="dim")]
    for line in missed_lines(cost):
        parts.append(Text(line, style="yellow" if "skipped" in line else "dim"))
    return Group(*parts)


def render_programs(cost: Cost) -> RenderableType:
    """Each BPF program's runs, time and skipped runs (the report's cost detail)."""
    t = Table(title="BPF programs (the kernel's own statistics)", title_justify="left")
    for col in ("program", "runs", "ns/run", "total", "skipped", "feeds"):
        t.add_column(col, justify="left" if col in ("program", "feeds") else "right")
    for p in cost.programs:
        t.add_row(p.hook, f"{p.runs:,}", fmt_ns(p.ns_per_run), f"{p.run_time_ns / 1e6:,.1f} ms",
                  fmt_count(p.missed), ", ".join(p.feeds))
    return t


def render_summary(run: Run, skip_notes: Collection[str] = ()) -> RenderableType:
    """The end of a run (and the top of a report); ``skip_notes``: notes already printed
    (at the start of a trace), not said twice."""
    m = run.meta
    c = run.connections
    server = run.server() if len(run.targets) <= 1 else None
    header = Text.assemble(
        ("acceptrace", "bold"),
        f"  {_what(m)}"
        + (f"  server {fmt_server(server.server, server.worker_class)}" if server else "")
        + f"  backend {m.backend}  {m.duration_s:.1f} s  kernel {m.kernel}",
    )
    keys = ("syn", "created", "queued", "accepted", "read") + (
        ("responded",) if c.get("responded") is not None else ())
    counts = Text(
        "connections: "
        + "  ".join(f"{k} {fmt_count(c.get(k))}" for k in keys)
        + (f"  syn_retried {fmt_count(c['syn_retried'])}" if c.get("syn_retried") is not None
           else "")
    )
    legend = Text(
        "\n".join(f"  {k}: {v}" for k, v in STAGE_MEANING.items()
                  if run.stages.get(k) is not None),
        style="dim",
    )
    parts: list[RenderableType] = [header]
    several = len(run.targets) > 1
    if several or m.all_listeners:
        parts.append(render_listener_table(run))
        untraced = run.extra.get("listeners_untraced")
        if untraced:
            parts.append(Text(f"{untraced} more listeners were found but not traced: one run "
                              "holds a bounded number (docs/listeners.md)", style="yellow"))
        parts.append(Text("totals over the listeners (each one's figures: "
                          "acceptrace report RUN.json --port PORT):", style="bold"))
    parts += [counts, _stage_table(run), legend, _queues_table(run),
              _drops_table(run), _other_counters(run), _procs_table(run)]
    if run.slowest:
        parts.append(_slowest_table(run))
    for note in m.notes:
        if note not in skip_notes:
            parts.append(Text(f"note: {note}", style="dim"))
    if run.cost is not None:
        parts.append(render_cost(run.cost))
    return Group(*parts)


def render_interval_line(run: Run, interval: Interval, label: bool = False) -> str:
    """One compact, greppable line per interval (no colour); ``label``: start with the
    listener's namespace and port (one line per listener of a run of several)."""
    when = ""
    try:
        started = datetime.fromisoformat(run.meta.started)
        when = (started + timedelta(seconds=interval.t_s)).strftime("%H:%M:%S") + " "
    except ValueError:
        pass
    rate = interval.accepted / interval.duration_s if interval.duration_s > 0 else 0.0
    backlog = run.queues.backlog
    depth = interval.accept_queue_depth_max
    parts = [
        f"{when}+{interval.t_s:.1f}s",
        *([f"{listeners.namespace_name(run)} port {run.meta.port}:"] if label else []),
        f"accepted {interval.accepted} ({rate:.0f}/s)",
        f"queued {interval.queued}",
        f"overflow {fmt_count(interval.listen_overflow)}",
        f"synack_rtx {interval.synack_retransmits}",
        f"acceptq_max {'-' if depth is None else depth}/{'?' if backlog is None else backlog}",
    ]
    for name, st in interval.stages.items():
        if not st.get("count"):
            continue
        short = SHORT_STAGE.get(name, name)
        parts.append(
            f"{short} p50 {fmt_compact_us(st.get('p50'))} p99 {fmt_compact_us(st.get('p99'))}"
        )
    return "  ".join(parts)


def render_end(run: Run, skip_notes: Collection[str] = ()) -> RenderableType:
    """What a trace prints when it ends: the summary, then the diagnosis last."""
    return Group(render_summary(run, skip_notes), render_diagnosis(run))


def render_text(run: Run, width: int = 100) -> str:
    return to_text(render_summary(run), width)


SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan"}


def octave_rows(h: Histogram, max_rows: int = 14) -> list[tuple[float, float, int]]:
    """The histogram's buckets merged per power of two: (lo, hi, count) rows, no gaps
    between the first and last non-empty row, at most ``max_rows`` (the tail merged)."""
    rows: dict[int, list[float]] = {}
    for lo, hi, c in h.nonempty_buckets():
        key = max(lo, 1).bit_length()
        r = rows.setdefault(key, [lo, hi, 0])
        r[0], r[1], r[2] = min(r[0], lo), max(r[1], hi), r[2] + c
    if not rows:
        return []
    keys = range(min(rows), max(rows) + 1)
    out = [(rows[k][0], rows[k][1], int(rows[k][2])) if k in rows
           else (float(1 << (k - 1)), float(1 << k), 0) for k in keys]
    while len(out) > max(1, max_rows):  # merge the two lowest rows
        (lo1, _h1, c1), (_l2, hi2, c2) = out[0], out[1]
        out[:2] = [(lo1, hi2, c1 + c2)]
    return out


def render_hist_chart(name: str, h: Histogram | None, width: int = 40,
                      max_rows: int = 14) -> RenderableType:
    """A horizontal bar chart of a histogram, one row per power of two."""
    t = Table(title=f"{name} histogram", title_justify="left", show_edge=False, box=None)
    t.add_column("range", justify="right", no_wrap=True)
    t.add_column("count", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    if h is None or not h.count:
        t.add_row("-", "0", "(no samples)")
        return t
    rows = octave_rows(h, max_rows)
    peak = max(c for _, _, c in rows) or 1
    fmt = fmt_us if h.unit == "us" else (lambda v: f"{v:.0f}")
    for lo, hi, c in rows:
        bar = "█" * max(1 if c else 0, round(width * c / peak))
        t.add_row(f"{fmt(lo)} – {fmt(hi)}", f"{c:,}", Text(bar, style="magenta"))
    return t


def dominant_stage(run: Run) -> str:
    """The stage whose p99 is largest among the per-connection waits (not the sums)."""
    best, best_v = "accept_queue", -1.0
    for name, h in run.stages.items():
        if name == "syn_to_accept" or h is None or not h.count:
            continue
        v = h.percentile(0.99) or 0.0
        if v > best_v:
            best, best_v = name, v
    return best


def render_diagnosis(run: Run) -> RenderableType:
    """The findings; a run of several listeners gets each listener's, worst first."""
    lines = [Text("diagnosis", style="bold")]
    if len(run.targets) > 1:
        for r in listeners.table(run):
            found = [f for f in diagnose(r.section) if f.rule not in ("healthy", "no_traffic")]
            for f in found:
                lines.append(Text.assemble(("• ", SEVERITY_STYLE[f.severity]),
                                           (f"{r.namespace} {r.address}: ", "bold"), f.text))
        if len(lines) == 1:
            lines.append(Text(f"• no accept-path problem on any of the {len(run.targets)} "
                              "listeners", style="cyan"))
        return Group(*lines)
    for f in diagnose(run):
        lines.append(Text.assemble(("• ", SEVERITY_STYLE[f.severity]), f.text))
    return Group(*lines)


def select_section(run: Run, port: int | None, namespace: str | None = None) -> Run | None:
    """The section of listener ``port`` (in the namespace named ``namespace``, as the
    listener table names it), or None.  A report without sections is its only listener."""
    for sec in run.targets or [run]:
        if port is not None and sec.meta.port != port:
            continue
        if namespace is not None and listeners.namespace_name(sec) != namespace:
            continue
        return sec
    return None


def render_report(run: Run) -> RenderableType:
    """`acceptrace report RUN.json`: summary, histograms and a diagnosis in words."""
    charts = [render_hist_chart(n, h) for n, h in run.stages.items() if h is not None and h.count]
    if run.queues.accept_queue_depth is not None and run.queues.accept_queue_depth.count:
        charts.append(render_hist_chart("accept-queue depth", run.queues.accept_queue_depth))
    cost = [render_programs(run.cost)] if run.cost is not None and run.cost.programs else []
    return Group(render_summary(run), *charts, *cost, render_diagnosis(run))


def _delta(a: float | None, b: float | None, unit: str) -> Text:
    if a is None or b is None:
        return Text("n/a", style="dim")
    diff = b - a
    pct = f" ({diff / a * 100:+.0f}%)" if a else ""
    style = "green" if diff < 0 else ("red" if diff > 0 else "")
    body = (("+" if diff >= 0 else "−") + fmt_us(abs(diff))) if unit == "us" else f"{diff:+,.0f}"
    return Text(body + pct, style=style)


def render_compare_listeners(a: Run, b: Run,
                             names: tuple[str, str] = ("before", "after")) -> RenderableType:
    """Two runs compared listener by listener (matched by namespace and port); a run
    of one listener is compared as a whole."""
    if len(a.targets) <= 1 and len(b.targets) <= 1:
        return render_compare(a, b, names)

    def key(sec: Run) -> tuple[str, int]:
        return (listeners.namespace_name(sec), sec.meta.port)

    ka = {key(s): s for s in a.targets}
    kb = {key(s): s for s in b.targets}
    parts: list[RenderableType] = []
    for k in dict.fromkeys([*ka, *kb]):
        parts.append(Text(f"\n{k[0]} port {k[1]}", style="bold underline"))
        if k in ka and k in kb:
            parts.append(render_compare(ka[k], kb[k], names))
        else:
            only = names[0] if k in ka else names[1]
            parts.append(Text(f"only in {only}", style="yellow"))
    return Group(*parts)


def render_compare(a: Run, b: Run, names: tuple[str, str] = ("before", "after")) -> RenderableType:
    """Two runs side by side: every percentile and counter with its delta."""
    head = Text(f"{names[0]}: port {a.meta.port}, {a.meta.duration_s:.1f} s, backlog "
                f"{a.queues.backlog}    {names[1]}: port {b.meta.port}, {b.meta.duration_s:.1f} s,"
                f" backlog {b.queues.backlog}")
    t = Table(title="stages", title_justify="left", show_edge=False)
    for col in ("stage", "figure", names[0], names[1], "Δ"):
        t.add_column(col, justify="left" if col in ("stage", "figure") else "right", no_wrap=True)
    for stage in dict.fromkeys([*a.stages, *b.stages]):
        ha, hb = a.stages.get(stage), b.stages.get(stage)
        for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)):
            va = ha.percentile(q) if ha else None
            vb = hb.percentile(q) if hb else None
            t.add_row(stage if label == "p50" else "", label, fmt_us(va), fmt_us(vb),
                      _delta(va, vb, "us"))
        t.add_row("", "count", fmt_count(ha.count if ha else None),
                  fmt_count(hb.count if hb else None),
                  _delta(ha.count if ha else None, hb.count if hb else None, "n"))
    c = Table(title="counters", title_justify="left", show_edge=False)
    for col in ("counter", names[0], names[1], "Δ"):
        c.add_column(col, justify="left" if col == "counter" else "right", no_wrap=True)
    sections = (("connections", a.connections, b.connections), ("drops", a.drops, b.drops),
                ("kernel", a.kernel_counters, b.kernel_counters))
    for section, da, db in sections:
        for k in dict.fromkeys([*da, *db]):
            va, vb = da.get(k), db.get(k)
            c.add_row(f"{section}.{k}", fmt_count(va), fmt_count(vb), _delta(va, vb, "n"))
    qa, qb = a.queues.accept_queue_depth, b.queues.accept_queue_depth
    c.add_row("queues.backlog", fmt_count(a.queues.backlog), fmt_count(b.queues.backlog),
              _delta(a.queues.backlog, b.queues.backlog, "n"))
    c.add_row("queues.accept_queue_depth.max",
              fmt_count(int(qa.max) if qa and qa.max is not None else None),
              fmt_count(int(qb.max) if qb and qb.max is not None else None),
              _delta(qa.max if qa else None, qb.max if qb else None, "n"))
    return Group(head, t, c)


def to_text(renderable: RenderableType, width: int = 100) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, highlight=False,
            force_terminal=False).print(renderable)
    return buf.getvalue()
