"""Running a trace: the poll loop, signals, the live views, and the report file; and
the exporter's loop (``acceptrace export``): the HTTP server, scrapes, the textfile.

The backend comes from selection.py; only the CLI imports this module."""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import socket
import sys
import tempfile
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from types import FrameType
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from rich.console import Console, RenderableType

from . import bpfstats, nsname, procnet, selection
from .errors import UserError
from .model import Interval, Run, write_text_atomic
from .netns import NamespaceFinder, NetNamespace, open_netns
from .render import render_end, render_interval_line
from .session import Session

if TYPE_CHECKING:  # the exporter's imports are made by export() only: a trace starts quicker
    from prometheus_client import CollectorRegistry

    from .metrics import ExportView


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
    cost_every: int = bpfstats.DEFAULT_EVERY  # the kernel times our programs 1 interval in N

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
    before_summary: Callable[[Run], None] | None = None,
) -> Run:
    """Trace until --duration, a signal, or `stop`; always returns (and writes) the run.
    It ends by printing the summary and, last, the diagnosis; ``before_summary(run)`` is
    called just before (the demo's load generator says what its clients saw)."""
    clock = StartClock()
    if opts.all_namespaces and (opts.pid is not None or opts.netns is not None):
        raise UserError("--all-namespaces traces every namespace: leave out --pid and --netns")
    prep = selection.prepare()
    ns = open_netns(pid=opts.pid, path=opts.netns)
    finder = NamespaceFinder(ns) if opts.all_namespaces else None
    try:
        return _trace(opts, out, err, prep, ns, finder, clock, on_started, stop, before_summary)
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
    before_summary: Callable[[Run], None] | None = None,
) -> Run:
    clock.step("prepare")
    if prep.tracefs_mounted:
        err.print("acceptrace: mounted tracefs at /sys/kernel/tracing")
    for line in prep.stale_lines:
        err.print(f"acceptrace: {line}", style="dim")
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
    printed: set[str] = set()   # notes said on the way: the summary does not repeat them
    for note in backend.notes:
        err.print(f"acceptrace: note: {note}", style="dim")
        printed.add(note)
    stop = stop or StopFlag()
    session = Session(backend, None, opts.interval_s, slowest_n=opts.slowest_n,
                      ports=ports, namespaces=spaces,
                      find_namespaces=finder.find if finder is not None else None,
                      gone_namespaces=finder.take_gone if finder is not None else None,
                      cost_every=opts.cost_every)
    run: Run | None = None
    # Signals are caught until the report is written: a second Ctrl-C (or a SIGTERM)
    # while the programs are detached -- seconds on a slow machine -- must neither
    # abort the detach half-way nor lose the report.
    with handle_signals(stop):
        try:
            session.start()
            clock.step("snapshot")
            # Attach the dispatch uprobes before saying we are tracing.
            for msg in session.scan_servers():
                err.print(f"acceptrace: {msg}")
                printed.add(msg)
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
                _loop(session, opts, out, err, stop, listening, printed)
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
    if opts.json_path:
        err.print(f"acceptrace: report written to {opts.json_path}")
    if before_summary is not None:
        before_summary(run)
    out.print(render_end(run, printed))
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
    printed: set[str] | None = None,
) -> None:
    """One plain line per interval (no terminal, or --no-tui); the messages said are
    added to ``printed``."""
    seen = {"listening": listening}

    def on_tick(iv: Interval, msgs: list[str]) -> None:
        for msg in msgs:
            err.print(f"acceptrace: {msg}")
            if printed is not None:
                printed.add(msg)
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


# -- acceptrace export: a Prometheus exporter ------------------------------------------------

# Outside Prometheus' default port allocations (docs/exporter.md says why this one).
DEFAULT_EXPORT_PORT = 19435
DEFAULT_EXPORT_HOST = "127.0.0.1"


@dataclass
class ExportOptions:
    trace: TraceOptions
    listen: tuple[str, int] | None = (DEFAULT_EXPORT_HOST, DEFAULT_EXPORT_PORT)
    textfile: Path | None = None
    per_octave: int = 4
    fresh_s: float = 0.5   # a scrape reads the kernel again when its figures are older


def parse_listen(value: str) -> tuple[str, int]:
    """--listen HOST:PORT (an IP address, ``[v6]:PORT``, or ``localhost``); UserError."""
    host, sep, port_s = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise UserError(f"--listen must be ADDRESS:PORT, e.g. 127.0.0.1:{DEFAULT_EXPORT_PORT}, "
                        f"not {value!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--listen: {host!r} is not an IP address") from None
    try:
        port = int(port_s, 10)
    except ValueError:
        raise UserError(f"--listen: port must be a number from 0 to 65535, "
                        f"not {port_s!r}") from None
    if not 0 <= port <= 65535:
        raise UserError(f"--listen: port must be from 0 to 65535, not {port}")
    return host, port


def check_textfile(path: Path) -> None:
    """UserError (one line) unless a file can be written and renamed into path's directory."""
    parent = path.parent
    if path.is_dir():
        raise UserError(f"--textfile {path}: is a directory (name the .prom file in it)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise UserError(f"--textfile {path}: cannot write in {parent} "
                        f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


class _HTTPServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def open_http(listen: tuple[str, int], app: Callable) -> WSGIServer:
    """Bind and listen now (before the slow BPF load): a port in use is a UserError."""
    host, port = listen
    cls = _HTTPServer6 if ":" in host else _HTTPServer
    try:
        return make_server(host, port, app, server_class=cls, handler_class=_QuietHandler)
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise UserError(f"--listen {where}: cannot listen ({exc.strerror or exc})") from None


def exporter_app(metrics_app: Callable) -> Callable:
    """/metrics: the metrics; /: a line saying so; anything else: 404."""

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"acceptrace exporter: metrics at /metrics\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    return app


class ExportState:
    """The latest view, shared by the export loop (which makes it) and the scrapes.

    A scrape whose view is older than ``fresh_s`` asks the loop for a fresh read of
    the kernel and waits for it (at most ``wait_s``, then it takes the last one: a
    scrape must not time out because the loop is rescanning /proc): scrapes are
    synchronous, as Prometheus' exporter guidelines ask.  The loop's own thread never
    waits."""

    def __init__(self, fresh_s: float, wait_s: float = 0.5) -> None:
        self.fresh_s = fresh_s
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._view: ExportView | None = None
        self._gen = 0
        self._at = 0.0
        self.wanted = False
        self.closed = False
        self.owner = threading.get_ident()

    def publish(self, view: ExportView) -> None:
        with self._cond:
            self._view, self._at, self.wanted = view, time.monotonic(), False
            self._gen += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def get(self) -> ExportView | None:
        with self._cond:
            if (threading.get_ident() == self.owner or self.closed
                    or time.monotonic() - self._at <= self.fresh_s):
                return self._view
            gen = self._gen
            self.wanted = True
            self._cond.wait_for(lambda: self._gen != gen or self.closed, self.wait_s)
            return self._view


class NameCache:
    """Each namespace's label, found once (nsname.py); only namespaces still in the
    run are remembered."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}

    def update(self, spaces: list[NetNamespace]) -> dict[int, str]:
        self.names = {ns.inode: self.names.get(ns.inode) or nsname.namespace_label(ns)
                      for ns in spaces}
        return dict(self.names)


def _syn_queues(session: Session) -> dict[tuple[int, int], int]:
    """(namespace inode, port) -> requests in the SYN queue now, for the traced ports."""
    ports: dict[int, set[int]] = {}
    for t in session.targets.values():
        ports.setdefault(t.netns.inode, set()).add(t.port)
    out: dict[tuple[int, int], int] = {}
    for ino, st in session.spaces.items():
        ns = st.netns
        if st.gone or ino not in ports or (ns.path is not None and ns.is_own):
            continue  # released: a closed namespace would read acceptrace's own
        try:
            counts = ns.call(procnet.syn_queue_lengths)
        except OSError:
            continue  # the gauge is left out for this scrape
        for port in ports[ino]:
            out[(ino, port)] = counts.get(port, 0)
    return out


def export(opts: ExportOptions, err: Console, *,
           on_started: Callable[[str], None] | None = None,
           stop: StopFlag | None = None) -> Run:
    """Serve /metrics (and/or write the textfile) until a signal; returns the final run."""
    clock = StartClock()
    t = opts.trace
    if t.all_namespaces and (t.pid is not None or t.netns is not None):
        raise UserError("--all-namespaces traces every namespace: leave out --pid and --netns")
    if opts.listen is None and opts.textfile is None:
        raise UserError("nothing to export to: give --listen or --textfile")
    if opts.textfile is not None:
        check_textfile(opts.textfile)
    from prometheus_client import CollectorRegistry, make_wsgi_app  # noqa: PLC0415

    from .metrics import RunCollector  # noqa: PLC0415

    state = ExportState(opts.fresh_s)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RunCollector(state.get, opts.per_octave))
    httpd = (open_http(opts.listen, exporter_app(make_wsgi_app(registry)))
             if opts.listen is not None else None)
    try:
        prep = selection.prepare()
        ns = open_netns(pid=t.pid, path=t.netns)
        finder = NamespaceFinder(ns) if t.all_namespaces else None
        try:
            return _export(opts, err, prep, ns, finder, clock, state, registry, httpd,
                           on_started, stop or StopFlag())
        finally:
            if finder is not None:
                finder.close()
            ns.close()
    finally:
        state.close()
        if httpd is not None:
            httpd.server_close()


def _export(
    opts: ExportOptions,
    err: Console,
    prep: selection.Prepared,
    ns: NetNamespace,
    finder: NamespaceFinder | None,
    clock: StartClock,
    state: ExportState,
    registry: CollectorRegistry,
    httpd: WSGIServer | None,
    on_started: Callable[[str], None] | None,
    stop: StopFlag,
) -> Run:
    from prometheus_client import generate_latest  # noqa: PLC0415

    from .metrics import ExportView  # noqa: PLC0415

    t = opts.trace
    clock.step("prepare")
    if prep.tracefs_mounted:
        err.print("acceptrace: mounted tracefs at /sys/kernel/tracing")
    for line in prep.stale_lines:
        err.print(f"acceptrace: {line}", style="dim")
    if prep.header_line:
        err.print(f"acceptrace: {prep.header_line}")
    ports = t.port_list()
    err.print(f"acceptrace: loading the {t.backend} backend (BCC compile, load, attach)",
              style="dim")
    spaces = [ns] + (finder.find() if finder is not None else [])
    backend = selection.choose_backend(
        t.backend, prep, t.dispatch, lambda msg: err.print(f"acceptrace: {msg}", style="dim"),
        slots=_slots(t, len(spaces)),
    )
    clock.step("load")
    for note in backend.notes:
        err.print(f"acceptrace: note: {note}", style="dim")
    # No intervals are recorded (Session.tick(record=False)): memory stays bounded.
    session = Session(backend, None, t.interval_s, slowest_n=t.slowest_n,
                      ports=ports, namespaces=spaces,
                      find_namespaces=finder.find if finder is not None else None,
                      gone_namespaces=finder.take_gone if finder is not None else None,
                      cost_every=t.cost_every)
    names = NameCache()
    write_errors: set[str] = set()

    def refresh() -> None:
        run = session.build_run()
        state.publish(ExportView(
            run, names.update([st.netns for st in session.spaces.values()]),
            _syn_queues(session)))
        if opts.textfile is not None:
            try:
                write_text_atomic(opts.textfile, generate_latest(registry).decode())
            except OSError as exc:
                msg = f"cannot write {opts.textfile}: {exc.strerror or exc}"
                if msg not in write_errors:  # once per distinct error; keep serving
                    write_errors.add(msg)
                    err.print(f"acceptrace: warning: {msg}", style="yellow")

    run: Run | None = None
    # Signals are caught until the final state is written (see trace()).
    with handle_signals(stop):
        serving: threading.Thread | None = None
        try:
            session.start()
            for msg in session.scan_servers():
                err.print(f"acceptrace: {msg}")
            refresh()
            if httpd is not None:
                serving = threading.Thread(target=httpd.serve_forever, name="http",
                                           kwargs={"poll_interval": 0.2}, daemon=True)
                serving.start()
            clock.step("servers")
            err.print(f"acceptrace: {clock.line()}", style="dim")
            what = (", ".join(f"port {p}" for p in ports) if ports else
                    f"every TCP listener ({len(session.targets)} now)")
            where = []
            if httpd is not None and opts.listen is not None:
                host, port = opts.listen[0], httpd.server_port  # port 0: the one it got
                where.append(f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics")
            if opts.textfile is not None:
                where.append(f"{opts.textfile} every {t.interval_s:g} s")
            line = (f"exporting {what} ({backend.name} backend) to {' and '.join(where)}; "
                    "SIGTERM to stop")
            err.print(f"acceptrace: {line}", style="bold")
            if on_started:
                on_started(line)
            next_tick = time.monotonic() + t.interval_s
            while not stop.set:
                session.poll(100)
                now = time.monotonic()
                if state.wanted or now >= next_tick:
                    session.tick(record=False)
                    refresh()  # the waiting scrape first; then the processes (slower)
                    for msg in session.scan_servers():
                        err.print(f"acceptrace: {msg}")
                    if now >= next_tick:
                        next_tick += t.interval_s * max(1, int((now - next_tick)
                                                               // t.interval_s) + 1)
            run = session.finish()
            refresh()
        finally:
            state.close()
            if httpd is not None and serving is not None:
                httpd.shutdown()
            if run is None:
                try:
                    run = session.finish()
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
            backend.close()
        if t.json_path is not None:
            write_report(run, t.json_path)
            err.print(f"acceptrace: final state written to {t.json_path}")
    err.print("acceptrace: exporter stopped")
    return run
