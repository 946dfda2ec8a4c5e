"""Running a trace: the poll loop, signals, the live views, and the report file.

The backend comes from selection.py; only the CLI imports this module."""

from __future__ import annotations

import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console, RenderableType

from . import selection
from .errors import UserError
from .model import Interval, Run
from .netns import NamespaceFinder, NetNamespace, open_netns
from .render import render_interval_line, render_summary
from .session import Session


@dataclass
class TraceOptions:
    port: int | None = None     # one port (the demo, the tests); see ports
    duration_s: float | None = None
    interval_s: float = 1.0
    json_path: Path | None = None
    slowest_n: int = 20
    quiet_intervals: bool = False
    tui: bool = False
    hist_stage: str | None = None
    dispatch: bool = True
    backend: str = "auto"
    pid: int | None = None      # trace in this process's network namespace
    netns: str | None = None    # ... or in this one (ip netns NAME, or a path)
    ports: list[int] = field(default_factory=list)  # --port, as often as given
    all_namespaces: bool = False  # every network namespace of the host

    def port_list(self) -> list[int]:
        """The traced ports; [] means every listener."""
        return list(dict.fromkeys(self.ports or ([self.port] if self.port else [])))


def parse_pid(value: str | int) -> int:
    """A process id from user input; UserError otherwise."""
    try:
        pid = int(str(value).strip(), 10)
    except ValueError:
        raise UserError(f"--pid must be a process id, not {value!r}") from None
    if pid <= 0:
        raise UserError(f"--pid must be a positive process id, not {pid}")
    return pid


def parse_port(value: str | int) -> int:
    """A TCP port, 1..65535, from user input; UserError otherwise."""
    try:
        port = int(str(value).strip(), 10)
    except ValueError:
        raise UserError(f"--port must be a number from 1 to 65535, not {value!r}") from None
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, not {port}")
    return port


# Escape sequences of the keys the dashboard uses (xterm and VT100 cursor keys).
KEY_SEQUENCES = {"\x1b[A": "up", "\x1b[B": "down", "\x1bOA": "up", "\x1bOB": "down"}
KEY_NAMES = {"\r": "enter", "\n": "enter", "\x7f": "backspace", "\x08": "backspace"}


def key_names(data: str) -> list[str]:
    """Keys from what the terminal sent: cursor keys by name, a lone Esc as "esc"."""
    out: list[str] = []
    i = 0
    while i < len(data):
        seq = next((q for q in KEY_SEQUENCES if data.startswith(q, i)), None)
        if seq is not None:
            out.append(KEY_SEQUENCES[seq])
            i += len(seq)
            continue
        ch = data[i]
        if ch == "\x1b":
            # an unknown sequence: skip it whole; a lone Esc is a key
            j = i + 1
            if j < len(data) and data[j] in "[O":
                j += 1
                while j < len(data) and not data[j].isalpha() and data[j] != "~":
                    j += 1
                i = j + 1
                continue
            out.append("esc")
        else:
            out.append(KEY_NAMES.get(ch, ch))
        i += 1
    return out


class KeyReader:
    """Keys from the terminal (cbreak mode) in a thread, while the dashboard runs."""

    def __init__(self, on_key: Callable[[str], None]) -> None:
        self.on_key = on_key
        self._stop = threading.Event()
        self._saved: list | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> KeyReader:
        fd = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None
        if fd is None:
            return self
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True)
        self._thread.start()
        return self

    def _run(self, fd: int) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                # a cursor key arrives as one read of its whole sequence
                for key in key_names(os.read(fd, 64).decode(errors="ignore")):
                    self.on_key(key)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
        if self._saved is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._saved)


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP; the loop then finishes and writes the report."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def set(self) -> bool:
        return self.signum is not None


@contextmanager
def handle_signals(flag: StopFlag) -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, flag) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_report(run: Run, path: Path) -> None:
    try:
        run.write_atomic(path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


class StartClock:
    """Where a start goes: seconds per step, from the process's own start time."""

    def __init__(self) -> None:
        self.t0 = process_start_monotonic()
        self.last = time.monotonic()
        self.steps: list[tuple[str, float]] = [("python", self.last - self.t0)]

    def step(self, name: str) -> None:
        now = time.monotonic()
        self.steps.append((name, now - self.last))
        self.last = now

    def line(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.steps)
        return f"started in {self.last - self.t0:.1f} s ({parts})"


def process_start_monotonic() -> float:
    """CLOCK_MONOTONIC at this process's exec (from /proc/self/stat), so the
    interpreter's and the imports' time is counted; now() if unreadable."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # starttime: field 22, in clock ticks since boot
        since_boot = ticks / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.monotonic() - max(0.0, uptime - since_boot)
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def trace(
    opts: TraceOptions,
    out: Console,
    err: Console,
    *,
    on_started: Callable[[], None] | None = None,
    stop: StopFlag | None = None,
) -> Run:
    """Trace until --duration, a signal, or `stop`; always returns (and writes) the run."""
    clock = StartClock()
    if opts.all_namespaces and (opts.pid is not None or opts.netns is not None):
        raise UserError("--all-namespaces traces every namespace: leave out --pid and --netns")
    prep = selection.prepare()
    ns = open_netns(pid=opts.pid, path=opts.netns)
    finder = NamespaceFinder(ns) if opts.all_namespaces else None
    try:
        return _trace(opts, out, err, prep, ns, finder, clock, on_started, stop)
    finally:
        if finder is not None:
            finder.close()
        ns.close()


def _slots(opts: TraceOptions, namespaces: int) -> int:
    """How many targets the programs must hold: every (namespace, port) pair named,
    or room for every listener; UserError when this machine cannot hold them."""
    cap = selection.target_capacity(selection.possible_cpus())
    ports = opts.port_list()
    if not ports or opts.all_namespaces:
        return min(selection.ALL_LISTENERS_SLOTS, cap)
    need = len(ports) * namespaces
    if need > cap:
        raise UserError(f"{need} ports are more than one run can trace on this machine "
                        f"({cap}: per-listener histograms per CPU, see docs/listeners.md)")
    return need


def _trace(
    opts: TraceOptions,
    out: Console,
    err: Console,
    prep: selection.Prepared,
    ns: NetNamespace,
    finder: NamespaceFinder | None,
    clock: StartClock,
    on_started: Callable[[], None] | None,
    stop: StopFlag | None,
) -> Run:
    clock.step("prepare")
    if prep.tracefs_mounted:
        err.print("acceptrace: mounted tracefs at /sys/kernel/tracing")
    if prep.header_line:
        err.print(f"acceptrace: {prep.header_line}")
    ports = opts.port_list()
    where = "" if ns.is_own else f" in network namespace {ns.label} (inode {ns.inode})"
    if finder is not None:
        where = " in every network namespace"
    listening = True
    now = {s.port for s in ns.listening_sockets(None)} if ports and finder is None else set()
    for port in ports if finder is None else []:
        if port not in now:
            listening = False
            err.print(
                f"acceptrace: warning: nothing is listening on port {port}{where} yet; "
                "tracing anyway (a server may start later)",
                style="yellow",
            )

    # Say each slow step before it starts: on a slow machine (or a TCG guest) a
    # start takes tens of seconds, and whoever waits should see where it is.
    err.print(f"acceptrace: loading the {opts.backend} backend (BCC compile, load, attach)",
              style="dim")
    spaces = [ns] + (finder.find() if finder is not None else [])
    backend = selection.choose_backend(
        opts.backend, prep, opts.dispatch,
        lambda msg: err.print(f"acceptrace: {msg}", style="dim"),
        slots=_slots(opts, len(spaces)),
    )
    clock.step("load")
    for note in backend.notes:
        err.print(f"acceptrace: note: {note}", style="dim")
    stop = stop or StopFlag()
    session = Session(backend, None, opts.interval_s, slowest_n=opts.slowest_n,
                      ports=ports, namespaces=spaces,
                      find_namespaces=finder.find if finder is not None else None,
                      gone_namespaces=finder.take_gone if finder is not None else None)
    run: Run | None = None
    try:
        with handle_signals(stop):
            session.start()
            clock.step("snapshot")
            # Attach the dispatch uprobes before saying we are tracing.
            for msg in session.scan_servers():
                err.print(f"acceptrace: {msg}")
            clock.step("servers")
            err.print(f"acceptrace: {clock.line()}", style="dim")
            what = (f"port {ports[0]}" if len(ports) == 1 else
                    f"ports {', '.join(map(str, ports))}" if ports else
                    f"every TCP listener ({len(session.targets)} now)")
            err.print(
                f"acceptrace: tracing {what}{where} with the {backend.name} backend"
                + (f" for {opts.duration_s:g} s" if opts.duration_s else "; Ctrl-C to stop"),
                style="bold",
            )
            if on_started:
                on_started()
            if opts.tui:
                _live_loop(session, opts, out, stop)
            else:
                _loop(session, opts, out, err, stop, listening)
            run = session.finish()
    finally:
        if run is None:
            # An error in the loop: keep what was measured, then re-raise.
            try:
                run = session.finish()
                if opts.json_path:
                    write_report(run, opts.json_path)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        backend.close()
    if opts.json_path:
        write_report(run, opts.json_path)
    out.print(render_summary(run))
    if opts.json_path:
        err.print(f"acceptrace: report written to {opts.json_path}")
    return run


@dataclass
class _View:
    """What the dashboard shows: the run so far and the last interval."""

    run: Run
    iv: Interval | None = None


def _live_loop(session: Session, opts: TraceOptions, out: Console, stop: StopFlag) -> None:
    """The rich dashboard, redrawn every interval and on each key."""
    from rich.live import Live  # noqa: PLC0415

    from .dashboard import DashboardState, render_dashboard  # noqa: PLC0415

    state = DashboardState(hist_stage=opts.hist_stage)
    view = _View(session.build_run())
    lock = threading.Lock()
    redraw = threading.Event()

    def on_key(key: str) -> None:
        with lock:
            if key in ("q", "Q"):
                stop(signal.SIGINT, None)
            elif key in ("h", "H"):
                state.next_hist(state.section(view.run) or view.run)
            elif key == "?":
                state.explain = not state.explain
            elif key in ("up", "k"):
                state.move(view.run, -1)
            elif key in ("down", "j"):
                state.move(view.run, 1)
            elif key == "enter":
                state.enter(view.run)
            elif key in ("esc", "backspace", "b"):
                state.back()
        redraw.set()

    def draw() -> RenderableType:
        return render_dashboard(view.run, view.iv, state, out.size.height)

    def on_tick(iv: Interval, _msgs: list[str]) -> None:
        # Dispatch messages go to meta.notes; the screen belongs to the dashboard.
        with lock:
            view.run, view.iv = session.build_run(), iv
        redraw.set()

    def after_poll() -> None:
        if redraw.is_set():
            redraw.clear()
            with lock:
                live.update(draw(), refresh=True)

    with Live(draw(), console=out, auto_refresh=False, screen=True,
              vertical_overflow="crop") as live, KeyReader(on_key):
        _run_intervals(session, opts, stop, on_tick, after_poll, poll_ms=100)


def _run_intervals(
    session: Session,
    opts: TraceOptions,
    stop: StopFlag,
    on_tick: Callable[[Interval, list[str]], None],
    after_poll: Callable[[], None] | None = None,
    poll_ms: int = 200,
) -> None:
    """Poll the ring buffer until --duration or a signal; close an interval on time."""
    start = time.monotonic()
    deadline = start + opts.duration_s if opts.duration_s else None
    next_tick = start + opts.interval_s
    while not stop.set:
        now = time.monotonic()
        until = next_tick if deadline is None else min(next_tick, deadline)
        session.poll(max(0, min(poll_ms, int((until - now) * 1000))))
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if now >= next_tick:
            iv = session.tick()
            msgs = session.scan_servers()
            # Skip intervals that a stall (e.g. a suspended terminal) left behind.
            next_tick += opts.interval_s * max(1, int((now - next_tick) // opts.interval_s) + 1)
            on_tick(iv, msgs)
        if after_poll is not None:
            after_poll()


def _loop(
    session: Session,
    opts: TraceOptions,
    out: Console,
    err: Console,
    stop: StopFlag,
    listening: bool,
) -> None:
    """One plain line per interval (no terminal, or --no-tui)."""
    seen = {"listening": listening}

    def on_tick(iv: Interval, msgs: list[str]) -> None:
        for msg in msgs:
            err.print(f"acceptrace: {msg}")
        if not seen["listening"] and not session.all_listeners and session.listening():
            seen["listening"] = True
            err.print("acceptrace: a listener appeared on port "
                      + ", ".join(str(t.port) for t in session.targets.values() if t.listening))
        if not opts.quiet_intervals:
            run = session.build_run()
            out.print(render_interval_line(run, iv), highlight=False)
            if len(run.targets) > 1:
                # one line per listener that saw traffic, worst first
                for sec in run.targets:
                    if sec.recent is not None and (sec.recent.queued or sec.recent.accepted
                                                   or sec.recent.listen_overflow):
                        out.print("  " + render_interval_line(sec, sec.recent, label=True),
                                  highlight=False)

    _run_intervals(session, opts, stop, on_tick)
