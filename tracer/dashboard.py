"""The live terminal dashboard (rich), and the explanation of every figure.

``render_dashboard`` is a pure function of the run so far: the runner feeds
it to ``rich.live.Live`` every interval; tests render it to text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import listeners
from .hist import Histogram
from .model import Interval, Run
from .render import cost_line, dominant_stage, render_hist_chart, render_listener_table
from .words import fmt_us

FLOW = (  # (column title, stage whose latency ends at this step, interval count field)
    ("SYN", None, "syn"),
    ("handshake", "handshake", "queued"),
    ("accept queue", "accept_queue", "accepted"),
    ("accept()", "syn_to_accept", "accepted"),
    ("read", "accept_to_read", "read"),
    ("dispatch", "read_to_dispatch", "dispatched"),
    ("response", "read_to_response", "responded"),
)

EXPLAIN: dict[str, str] = {
    "SYN": "A client's first packet. The kernel answers with a SYN-ACK and keeps a small "
           "request in the SYN queue until the client's final ACK arrives.",
    "handshake": "SYN to 'queued': one network round trip. High means a slow or lossy network, "
                 "or SYN-ACKs being retransmitted (the client's ACK was lost or dropped).",
    "accept queue": "Time a finished connection waits for the server to call accept(). High "
                    "means the server is busy: an event loop blocked by synchronous code, "
                    "CPU-bound handlers, or too few workers. Fix the blocking code or add "
                    "workers; a bigger backlog only lets more connections wait.",
    "accept()": "SYN to accept(): everything the client waited before the server even saw "
                "the connection.",
    "read": "accept() to the server's first read of the request. High means the event loop "
            "accepted the connection but was busy with other work before reading it.",
    "dispatch": "uvicorn (httptools) only: first read to the ASGI dispatch of the request "
                "(headers parsed). High means the event loop is busy before the app runs.",
    "response": "First read to the first byte the server writes back on the connection, for "
                "any TCP server (kernel-side): the server's own time for the request. With "
                "keep-alive, the first request of each connection only. High means slow "
                "handlers, a slow upstream, or a server too busy to get to it.",
    "server": "Which server accepts on the port, recognised from its processes (program, "
              "command line, parent, loaded modules): nginx, gunicorn (and its worker "
              "class), uvicorn, hypercorn, granian, node, a Python socketserver; the "
              "diagnosis then names that server's own backlog and worker options.",
    "accept-queue gauge": "Connections waiting for accept() against the backlog limit "
                          "(listen(backlog), capped by net.core.somaxconn). When it is full the "
                          "kernel drops new SYNs (clients retry after 1 s, 3 s, ...) or final "
                          "ACKs: raise the backlog and somaxconn only after the server is fast "
                          "enough.",
    "SYN-queue gauge": "Half-open connections (SYN received, final ACK not yet). Full means a "
                       "SYN flood or a very high connection rate; syncookies then take over.",
    "listen overflows": "Connections refused because the accept queue was full "
                        "(TcpExtListenOverflows).",
    "SYNs dropped": "Those clients wait at least 1 s before their retry: the classic 1 s / 3 s "
                    "latency spikes.",
    "SYN-ACK retransmits": "The server resent its SYN-ACK because no final ACK came (lost, or "
                           "dropped for a full accept queue).",
    "syncookies": "Connections admitted by a syncookie because the SYN queue was full.",
    "processes": "Which processes called accept(): with uvicorn --workers N, one line per "
                 "worker; a very uneven split is the thundering herd on one shared socket.",
    "listener table": "With several ports, or no --port: one row per listener (namespace, "
                      "port), worst first: overflowing, then dropping SYNs, then the slowest "
                      "accept queue, then the busiest; rates over the last interval. Up/down "
                      "(or j/k) and Enter show one listener's dashboard; Esc goes back.",
}


def explain_text() -> str:
    return "\n\n".join(f"{k}\n  {v}" for k, v in EXPLAIN.items())


@dataclass
class DashboardState:
    hist_stage: str | None = None   # None: the stage that dominates
    explain: bool = False
    cursor: int = 0                 # the listener table's selected row
    selected: tuple[str, int] | None = None  # (namespace, port) shown alone; None: the table

    def keys(self, run: Run) -> list[tuple[str, int]]:
        return [(r.namespace, r.section.meta.port)
                for r in listeners.table(run, listeners.NOW)]

    def move(self, run: Run, step: int) -> None:
        n = len(run.targets)
        if self.selected is None and n:
            self.cursor = max(0, min(n - 1, self.cursor + step))

    def enter(self, run: Run) -> None:
        keys = self.keys(run)
        if self.selected is None and keys:
            self.selected = keys[min(self.cursor, len(keys) - 1)]

    def back(self) -> None:
        self.selected = None

    def section(self, run: Run) -> Run | None:
        """The selected listener's section, while it is in the run."""
        if self.selected is None:
            return None
        for r in listeners.table(run, listeners.NOW):
            if (r.namespace, r.section.meta.port) == self.selected:
                return r.section
        return None

    def next_hist(self, run: Run) -> None:
        names = [n for n, h in run.stages.items() if h is not None]
        if not names:
            return
        cur = self.hist_stage or dominant_stage(run)
        self.hist_stage = names[(names.index(cur) + 1) % len(names)] if cur in names else names[0]


def _p(h: Histogram | None, q: float) -> float | None:
    return None if h is None else h.percentile(q)


def _flow(run: Run, iv: Interval | None) -> Table:
    t = Table(show_edge=False, pad_edge=False, expand=True)
    t.add_column("", no_wrap=True, style="dim")
    flow = [f for f in FLOW if f[1] is None or f[1] in run.stages and run.stages[f[1]] is not None]
    for title, _, _ in flow:
        t.add_column(title, justify="right", no_wrap=True)
    dur = iv.duration_s if iv and iv.duration_s > 0 else None

    def rate(field: str) -> str:
        if iv is None or dur is None:
            return "-"
        v = getattr(iv, field, None)
        return "n/a" if v is None else f"{v / dur:,.0f}/s"

    def stage_cell(stage: str | None, q: float, last: bool) -> str:
        if stage is None:
            return ""
        if last:
            st = iv.stages.get(stage) if iv else None
            return fmt_us(st.get("p50" if q == 0.5 else "p99")) if st and st.get("count") else "-"
        return fmt_us(_p(run.stages.get(stage), q))

    t.add_row("conn/s", *(rate(f) for _, _, f in flow))
    t.add_row("p50 last", *(stage_cell(s, 0.5, True) for _, s, _ in flow))
    t.add_row("p99 last", *(stage_cell(s, 0.99, True) for _, s, _ in flow))
    t.add_row("p50 run", *(stage_cell(s, 0.5, False) for _, s, _ in flow))
    t.add_row("p99 run", *(stage_cell(s, 0.99, False) for _, s, _ in flow))
    return t


def gauge(label: str, now: int | None, peak: int | None, limit: int | None,
          width: int = 30) -> Text:
    """`label [██████░░░░] now 7  max 9 / 8` -- red once the peak exceeds the limit."""
    full = limit is not None and peak is not None and peak > limit
    busy = bool(limit and peak and peak >= 0.8 * limit)
    style = "bold red" if full else ("yellow" if busy else "green")
    cap = max(limit or 0, peak or 0, 1)
    filled = round(width * min(now if now is not None else (peak or 0), cap) / cap)
    bar = Text.assemble(f"{label:<13}[", ("█" * filled, style),
                        ("░" * (width - filled), "dim"), "] ")
    bar.append(f"now {'-' if now is None else now}  max {'-' if peak is None else peak}"
               f" / {'?' if limit is None else limit}", style=style)
    if full:
        bar.append("  OVERFLOW", style="bold red")
    return bar


def _drops(run: Run, iv: Interval | None) -> Table:
    t = Table(show_edge=False, pad_edge=False, expand=True)
    cols: tuple[tuple[str, Literal["left", "right"]], ...] = (
        ("drops", "left"), ("last /s", "right"), ("run", "right"),
        ("kernel Δ", "right"), ("meaning", "left"))
    for col, j in cols:
        t.add_column(col, justify=j, no_wrap=col != "meaning")
    dur = iv.duration_s if iv and iv.duration_s > 0 else None
    k = run.kernel_counters

    def per_s(v: int | None) -> str:
        return "n/a" if v is None or dur is None else f"{v / dur:,.1f}"

    rows = (
        ("listen overflows", iv.listen_overflow if iv else None, run.drops.get("listen_overflow"),
         k.get("TcpExtListenOverflows"), "accept queue full"),
        ("SYNs dropped", iv.syn_dropped if iv else None, run.drops.get("syn_dropped"), None,
         "client retries after 1 s"),
        ("SYN-ACK rtx", iv.synack_retransmits if iv else None,
         run.drops.get("synack_retransmits"), None, "final ACK lost or dropped"),
        ("syncookies", iv.syncookies if iv else None, run.drops.get("syncookies"),
         k.get("TcpExtSyncookiesSent"), "SYN queue full"),
    )
    for name, last, total, kern, meaning in rows:
        style = "red" if total else ""
        t.add_row(Text(name, style=style), per_s(last),
                  Text("n/a" if total is None else f"{total:,}", style=style),
                  "" if kern is None else f"{kern:,}", Text(meaning, style="dim"))
    return t


def _procs_and_slowest(run: Run, rows: int) -> Table:
    t = Table(show_edge=False, pad_edge=False, expand=True)
    t.add_column("pid", justify="right", no_wrap=True)
    t.add_column("comm", no_wrap=True)
    t.add_column("accepted", justify="right", no_wrap=True)
    t.add_column("slowest client", no_wrap=True)
    t.add_column("accept queue", justify="right", no_wrap=True)
    t.add_column("total", justify="right", no_wrap=True)
    for i in range(rows):
        p = run.processes[i] if i < len(run.processes) else None
        s = run.slowest[i] if i < len(run.slowest) else None
        if p is None and s is None:
            break
        t.add_row(str(p.pid) if p else "", p.comm if p else "", f"{p.accepted:,}" if p else "",
                  f"{s.saddr}:{s.sport}" if s else "", fmt_us(s.accept_queue_us) if s else "",
                  fmt_us(s.total_us) if s else "")
    return t


def _head(what: Text, keys: str) -> Table:
    """One line: what is shown on the left, the keys on the right; on a narrow terminal
    the long ends are cut, never wrapped onto a second line."""
    t = Table.grid(expand=True)
    t.add_column(no_wrap=True, overflow="ellipsis", min_width=min(len(what.plain), 64))
    t.add_column(justify="right", no_wrap=True, overflow="ellipsis")
    t.add_row(what, Text(keys, style="dim"))
    return t


def render_dashboard(run: Run, iv: Interval | None, state: DashboardState,
                     height: int = 24) -> RenderableType:
    """One screen; fits 80x24 and uses the room of a larger terminal.  A run of several
    listeners shows the listener table until one is selected."""
    if len(run.targets) > 1 or (run.meta.all_listeners and not state.selected):
        sec = state.section(run)
        if sec is None:
            return _listener_screen(run, state, height)
        run, iv = sec, sec.recent
    m = run.meta
    server = run.server()
    head = _head(Text.assemble(
        ("acceptrace ", "bold"), f"port {m.port} · ",
        (f"{server.server} · " if server else ""),
        f"{m.duration_s:,.0f} s · accepted {run.connections.get('accepted') or 0:,}"),
        "  h hist · ? explain · q quit")
    if state.explain:
        return Group(head, Panel(Text(explain_text()), title="what the figures mean"))
    q = run.queues
    aq = q.accept_queue_depth
    sq = q.syn_queue_depth
    gauges = Group(
        gauge("accept queue", iv.accept_queue_depth_now if iv else None,
              int(aq.max) if aq is not None and aq.max is not None else None, q.backlog),
        gauge("SYN queue", iv.syn_queue_depth_max if iv else None,
              int(sq.max) if sq is not None and sq.max is not None else None, q.backlog),
    )
    parts: list[RenderableType] = [head, _flow(run, iv), gauges, _drops(run, iv)]
    spare = height - 17  # the lines used so far (80 columns)
    stage = state.hist_stage or dominant_stage(run)
    if spare >= 5:
        rows = min(14, spare - 2, 4 + (height - 24) // 2)
        parts.append(render_hist_chart(stage, run.stages.get(stage), width=36, max_rows=rows))
        spare -= rows + 2
    else:
        h = run.stages.get(stage)
        parts.append(Text(f"{stage}: p50 {fmt_us(_p(h, 0.5))}  p99 {fmt_us(_p(h, 0.99))}  "
                          f"max {fmt_us(h.max if h else None)}  (taller terminal: histogram)",
                          style="dim"))
        spare -= 1
    if spare >= 3:
        parts.append(_procs_and_slowest(run, min(8, spare - 2)))
    if spare >= 2 and run.cost is not None:
        parts.append(Text(cost_line(run.cost), style="dim", overflow="ellipsis", no_wrap=True))
        spare -= 1
    for note in m.notes[:1]:
        parts.append(Text(f"note: {note}", style="dim"))
    return Group(*parts)


def _listener_screen(run: Run, state: DashboardState, height: int) -> RenderableType:
    m = run.meta
    n = len(run.targets)
    head = Text.assemble(
        ("acceptrace ", "bold"),
        f"{n} listener{'s' if n != 1 else ''} · {m.duration_s:,.0f} s · accepted "
        f"{run.connections.get('accepted') or 0:,}",
        ("   ↑↓ select · Enter show · ? explain · q quit", "dim"))
    if state.explain:
        return Group(head, Panel(Text(explain_text()), title="what the figures mean"))
    if not n:
        return Group(head, Text("no TCP listener yet: waiting for one to appear", style="dim"))
    state.cursor = min(state.cursor, n - 1)
    parts: list[RenderableType] = [
        head, render_listener_table(run, listeners.NOW, cursor=state.cursor,
                                    limit=max(3, height - 6))]
    untraced = run.extra.get("listeners_untraced")
    if untraced:
        parts.append(Text(f"{untraced} more listeners not traced (one run holds a bounded "
                          "number: docs/listeners.md)", style="yellow"))
    if run.cost is not None:
        parts.append(Text(cost_line(run.cost), style="dim", overflow="ellipsis", no_wrap=True))
    for note in m.notes[:1]:
        parts.append(Text(f"note: {note}", style="dim"))
    return Group(*parts)
