"""Running a trace: preflight checks, the poll loop, signals, and the report file."""

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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console, RenderableType

from . import headers, kernel, procnet
from .backend import Backend
from .errors import UserError
from .model import Interval, Run
from .render import render_interval_line, render_summary
from .session import Session


@dataclass
class TraceOptions:
    port: int
    duration_s: float | None = None
    interval_s: float = 1.0
    json_path: Path | None = None
    slowest_n: int = 20
    quiet_intervals: bool = False
    tui: bool = False
    hist_stage: str | None = None
    dispatch: bool = True
    backend: str = "auto"


BACKEND_CHOICES = ("auto", "fentry", "kprobe", "tracepoint")
AUTO_ORDER = ("fentry", "kprobe", "tracepoint")


def parse_port(value: str | int) -> int:
    """A TCP port, 1..65535, from user input; UserError otherwise."""
    try:
        port = int(str(value).strip(), 10)
    except ValueError:
        raise UserError(f"--port must be a number from 1 to 65535, not {value!r}") from None
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be from 1 to 65535, not {port}")
    return port


def require_root() -> None:
    if os.geteuid() != 0:
        raise UserError(
            "must run as root: loading BPF programs needs CAP_BPF and CAP_PERFMON "
            "(try: sudo acceptrace ...)",
            exit_code=1,
        )


@dataclass
class Prepared:
    defines: dict[str, int]
    notes: list[str]
    ack_overflow_observable: bool
    header_line: str | None
    tracefs_mounted: bool
    missing_tracepoints: list[str]
    funcs: kernel.FuncFeatures
    read_tracepoints: bool = False  # sock:sock_{recv,send}_length (6.3+)


def prepare() -> Prepared:
    """Everything that can fail with a clear message before a program is loaded."""
    require_root()
    from .bpfloader import import_bcc  # noqa: PLC0415 - keep bcc out of import time

    import_bcc()
    tracefs, mounted = kernel.ensure_tracefs()
    facts, _remembered = kernel.kernel_facts(tracefs)
    feats = facts.features
    tree = headers.find_header_tree()
    headers.activate(tree)
    notes = list(feats.notes)
    if facts.busy_why:
        notes.append(f"softirqs_busy not counted: {facts.busy_why}")
    return Prepared(
        defines={**feats.defines, **facts.busy},
        notes=notes,
        ack_overflow_observable=feats.ack_overflow_observable,
        header_line=tree.description if tree.kind == "merged" else None,
        tracefs_mounted=mounted,
        missing_tracepoints=feats.missing_tracepoints,
        funcs=facts.funcs,
        read_tracepoints=facts.read_tracepoints,
    )


def open_backend(name: str, port: int, prep: Prepared, dispatch: bool) -> Backend:
    """Load one backend's programs; UserError (one line) when this kernel refuses it."""
    from . import bpfloader  # noqa: PLC0415

    if name == "tracepoint":
        if prep.missing_tracepoints:
            raise UserError(
                "this kernel lacks the tracepoint(s) " + ", ".join(prep.missing_tracepoints)
                + " (sock:sk_data_ready and sock:sock_recv_length appeared in Linux 6.3)"
            )
        notes = list(prep.notes)
        if not prep.ack_overflow_observable:
            notes.append(kernel.ACK_OVERFLOW_NOTE)
        return bpfloader.TracepointBackend(
            port, prep.defines, ack_overflow_observable=prep.ack_overflow_observable,
            notes=notes, dispatch=dispatch,
        )
    ff = prep.funcs
    if ff.missing_required:
        raise UserError("this kernel lacks " + "; ".join(ff.missing_required))
    if name == "fentry":
        ok, why = bpfloader.fentry_supported()
        if not ok:
            raise UserError(why)
    if name == "kprobe" and not kernel.kprobes_available():
        raise UserError("kprobes are not available (no kprobe_events in tracefs: "
                        "the kernel is built without CONFIG_KPROBES)")
    defines = {**prep.defines, **ff.defines}
    replaced: set[str] = set()
    if prep.read_tracepoints:
        # Reads and writes from the 6.3+ tracepoints: no tcp_recvmsg/sendmsg hooks.
        defines["AT_READ_TRACEPOINTS"] = 1
        defines.pop("AT_HAVE_TCP_RECVMSG", None)
        defines.pop("AT_HAVE_TCP_SENDMSG", None)
        replaced = {"tcp_recvmsg", "tcp_sendmsg"}
    missing = kernel.stages_fed_by(set(ff.missing) - replaced)
    return bpfloader.BACKENDS[name](
        port, defines, ack_overflow_observable=True, notes=prep.notes + ff.notes,
        dispatch=dispatch, missing_stages=missing,
    )


def choose_backend(
    choice: str, port: int, prep: Prepared, dispatch: bool, say: Callable[[str], None]
) -> Backend:
    """--backend NAME, or auto: fentry, then kprobe, then tracepoint, by loading each."""
    if choice not in BACKEND_CHOICES:
        raise UserError(f"--backend must be one of {', '.join(BACKEND_CHOICES)}, not {choice!r}")
    if choice != "auto":
        try:
            return open_backend(choice, port, prep, dispatch)
        except UserError as exc:
            raise UserError(f"the {choice} backend cannot run here: {exc}") from None
    refused: list[str] = []
    for name in AUTO_ORDER:
        try:
            backend = open_backend(name, port, prep, dispatch)
        except UserError as exc:
            refused.append(f"{name}: {exc}")
            say(f"{name} backend unavailable ({exc}); falling back")
            continue
        backend.notes[:0] = [f"backend auto: {r}" for r in refused]
        return backend
    raise UserError("no backend can run on this kernel: " + "; ".join(refused))


class KeyReader:
    """Single keys from the terminal (cbreak mode) in a thread, while the dashboard runs."""

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
                ch = os.read(fd, 1).decode(errors="ignore")
                if ch:
                    self.on_key(ch)

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
    prep = prepare()
    clock.step("prepare")
    if prep.tracefs_mounted:
        err.print("acceptrace: mounted tracefs at /sys/kernel/tracing")
    if prep.header_line:
        err.print(f"acceptrace: {prep.header_line}")
    listening = bool(procnet.listening_sockets(opts.port))
    if not listening:
        err.print(
            f"acceptrace: warning: nothing is listening on port {opts.port} yet; "
            "tracing anyway (a server may start later)",
            style="yellow",
        )

    # Say each slow step before it starts: on a slow machine (or a TCG guest) a
    # start takes tens of seconds, and whoever waits should see where it is.
    err.print(f"acceptrace: loading the {opts.backend} backend (BCC compile, load, attach)",
              style="dim")
    backend = choose_backend(
        opts.backend, opts.port, prep, opts.dispatch,
        lambda msg: err.print(f"acceptrace: {msg}", style="dim"),
    )
    clock.step("load")
    for note in backend.notes:
        err.print(f"acceptrace: note: {note}", style="dim")
    stop = stop or StopFlag()
    session = Session(backend, opts.port, opts.interval_s, slowest_n=opts.slowest_n)
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
            err.print(
                f"acceptrace: tracing port {opts.port} with the {backend.name} backend"
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

    def on_key(ch: str) -> None:
        with lock:
            if ch in ("q", "Q"):
                stop(signal.SIGINT, None)
            elif ch in ("h", "H"):
                state.next_hist(view.run)
            elif ch == "?":
                state.explain = not state.explain
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
        if not seen["listening"] and session.listener_drops.last:
            seen["listening"] = True
            err.print(f"acceptrace: a listener appeared on port {opts.port}")
        if not opts.quiet_intervals:
            out.print(render_interval_line(session.build_run(), iv), highlight=False)

    _run_intervals(session, opts, stop, on_tick)
