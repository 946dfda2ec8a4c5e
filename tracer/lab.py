"""`acceptrace lab`: each failure mode of the accept path reproduced on demand.

A scenario is a symptom clients see, the root cause below Python that makes
it, and the fix.  Each runs twice -- as it is, then fixed -- and each run
happens in a network namespace of its own (``ip netns add``): the namespace's
sysctls (``net.core.somaxconn``, ``net.ipv4.tcp_syncookies``, ...) are set
there without touching the host, a real server (uvicorn+FastAPI, gunicorn with
uvicorn workers) listens there, the bundled load generator measures the
client's side there, and acceptrace traces the namespace as a child process
(``acceptrace --netns NS --port 8000 --json ...``, the command a user types;
docs/lab.md says why a child).  The namespace's own kernel counters
(``/proc/net/netstat`` read from inside it) are put beside both.  Everything
a scenario starts is torn down when it ends, fails, or is interrupted
(SIGINT/SIGTERM/SIGHUP are turned into an exception, and teardown itself is
shielded from them).

This module owns the scenarios, running them, and their text output; the HTML
comparison is html.py's (``render_html_compare``), the findings diagnose.py's.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import procnet
from .diagnose import Finding, diagnose
from .errors import UserError
from .model import Run, write_text_atomic
from .netns import NetNamespace, open_netns
from .stale import pid_alive
from .words import fmt_count, fmt_us

LAB_PORT = 8000                 # every scenario's server; each namespace has its own
NS_PREFIX = "atlab-"            # the lab's namespaces: atlab-<scenario>-<phase>-<lab pid>
# syn-flood: the flood's SYNs come from an address behind a veth (inside the namespace)
# whose peer has no address: the server's SYN-ACKs leave to a neighbour that does not
# exist, nobody answers them, and the requests stay in the SYN queue.
FLOOD_SERVER_IP, FLOOD_CLIENT_IP = "198.18.0.1", "198.18.0.99"  # RFC 2544 benchmark range
FLOOD_MAC = "02:00:00:00:00:63"
# The accept-path figures whose namespace deltas the lab prints and the tests check.
NETSTAT_KEYS = (
    "TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop",
    "TcpExtTCPReqQFullDoCookies", "TcpExtSyncookiesSent", "TcpExtSyncookiesRecv",
    "TcpPassiveOpens", "TcpExtEmbryonicRsts", "TcpOutRsts", "TcpExtTCPSynRetrans",
    # RSTs a socket of the namespace sent when its own side closed or gave up (a client
    # closing early, data after close): not the accept path's
    "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpExtTCPAbortOnTimeout",
)
BACKGROUND_LEAD_S = 0.5
PROBE_REQUESTS = 20             # requests timed first, one at a time (the machine's speed)
SIZED_MAX_S = 180.0             # ... and its longest run
IDLE_S = (2.0, 10.0)            # the server's idle wakeups: counted this long (a quarter of
                                # the load's duration, within these bounds) before the load
# A machine much slower than a real one (an emulated CPU: QEMU's TCG runs a guest 10-40
# times slower) gets the scenarios in the same proportions: the handlers' waits and CPU
# work, the clients' pauses and request timeouts are stretched by how much slower than
# REFERENCE_REQUEST_S it answers GET /health (stretch_factor).  On the emulated CPU the
# clients are slowed as much as the server; a 20 ms handler is then short beside the
# clients' own work, and the queue the scenario is about never fills (docs/lab.md).
REFERENCE_REQUEST_S = 0.0015    # GET /health on a new connection: 1.2-1.4 ms on a 2-core VM
SLOW_MACHINE = 4.0              # a factor below this is a busy machine, not a slow one: 1
MAX_STRETCH = 40.0
MAX_TIMEOUT_STRETCH = 4.0       # request timeouts: a client waits longer, not without end
# settle(): the counters that must have stopped moving before the tracer stops, and how
# long it waits for that on a real machine: on a slower one, stretch times as long (a
# server whose handlers block 20 ms x 21 still had 14 connections queued after 15 s,
# the clients long gone: a guest's abort-on-overflow, CI on 30cd192)
SETTLE_S = 15.0
SETTLE_KEYS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPReqQFullDrop",
               "TcpExtSyncookiesSent", "TcpExtSyncookiesRecv", "TcpPassiveOpens")


# --- scenarios ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    """The server of one phase: uvicorn, or gunicorn with uvicorn workers."""

    backlog: int = 2048
    workers: int = 1
    gunicorn: bool = False
    reuse_port: bool = False     # gunicorn --reuse-port: one SO_REUSEPORT socket per worker
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, port: int) -> list[str]:
        if self.gunicorn:
            argv = [sys.executable, "-m", "gunicorn", "acceptrace.demo_app:app",
                    "--worker-class", "uvicorn.workers.UvicornWorker",
                    "--workers", str(self.workers), "--bind", f"0.0.0.0:{port}",
                    "--backlog", str(self.backlog), "--log-level", "info"]
            return argv + (["--reuse-port"] if self.reuse_port else [])
        argv = [sys.executable, "-m", "uvicorn", "acceptrace.demo_app:app",
                "--host", "0.0.0.0", "--port", str(port), "--backlog", str(self.backlog),
                "--log-level", "info", "--no-access-log"]
        return argv + (["--workers", str(self.workers)] if self.workers > 1 else [])

    def describe(self) -> str:
        if self.gunicorn:
            return (f"gunicorn -k uvicorn.workers.UvicornWorker -w {self.workers}"
                    + (" --reuse-port" if self.reuse_port else "")
                    + (f" --backlog {self.backlog}" if self.backlog != 2048 else ""))
        return ("uvicorn" + (f" --workers {self.workers}" if self.workers > 1 else "")
                + f" --backlog {self.backlog}")


@dataclass(frozen=True)
class Load:
    """The bundled load generator (acceptrace.loadgen): one new connection per request."""

    path: str
    concurrency: int
    duration_s: float = 4.0
    connect_timeout_s: float = 3.5
    timeout_s: float = 5.0
    max_requests: int | None = None
    processes: int = 1           # clients split over this many processes (CPUs)
    pause_s: float = 0.0         # each client's pause between a response and its next request
    sized: int = 0               # > 0: pause and duration fitted to the server's speed for
                                 # about this many connections (size_load)

    def argv(self, port: int, hold: bool = False) -> list[str]:
        argv = [sys.executable, "-m", "acceptrace.loadgen", "--host", "127.0.0.1",
                "--port", str(port), "--path", self.path, "--duration", f"{self.duration_s:g}",
                "--concurrency", str(self.concurrency),
                "--connect-timeout", f"{self.connect_timeout_s:g}",
                "--timeout", f"{self.timeout_s:g}", "--processes", str(self.processes),
                "--pause", f"{self.pause_s:g}"]
        argv += ["--hold"] if hold else []
        return argv + (["--max-requests", str(self.max_requests)] if self.max_requests else [])

    def describe(self) -> str:
        bound = (f"{self.max_requests} requests" if self.max_requests
                 else f"{self.duration_s:g} s")
        procs = f" from {self.processes} processes" if self.processes > 1 else ""
        procs += f", {self.pause_s * 1000:g} ms apart" if self.pause_s else ""
        who = f"{self.concurrency} client{'s' if self.concurrency != 1 else ''}"
        return f"{who}{procs}, GET {self.path}, {bound}"

    @property
    def longest_s(self) -> float:
        """The load generator's own bound on its run time."""
        return self.duration_s + self.connect_timeout_s + self.timeout_s


def stretch_factor(request_s: float) -> float:
    """How much slower than a real machine the server answers GET /health
    (``request_s``, its median): 1.0 unless it is at least SLOW_MACHINE times."""
    f = request_s / REFERENCE_REQUEST_S
    return 1.0 if f < SLOW_MACHINE else round(min(MAX_STRETCH, f), 1)


def stretch_path(path: str, f: float) -> str:
    """``path`` with its handler time (``ms=``) ``f`` times as long."""
    base, sep, query = path.partition("?")
    if not sep or f == 1.0:
        return path
    args = []
    for arg in query.split("&"):
        key, eq, value = arg.partition("=")
        if key == "ms" and eq:
            value = f"{float(value) * f:g}"
        args.append(key + eq + value)
    return f"{base}?{'&'.join(args)}"


def stretch_load(load: Load, f: float) -> Load:
    """``load`` for a machine ``f`` times slower (stretch_factor): its handlers' times
    and its clients' pauses ``f`` times, its request timeout up to MAX_TIMEOUT_STRETCH
    times as long.  Its duration and connect timeout stay: the kernel's SYN retransmits
    (1 s, 3 s) do not slow down with the CPU.  A sized load is fitted to the server
    already (size_load)."""
    if f == 1.0 or load.sized:
        return load
    return replace(load, path=stretch_path(load.path, f), pause_s=round(load.pause_s * f, 4),
                   timeout_s=round(load.timeout_s * min(f, MAX_TIMEOUT_STRETCH), 1))


def size_load(load: Load, request_s: float) -> Load:
    """``load`` fitted to a server that answers one request in ``request_s`` (its median,
    measured before the run): each client pauses twice that between requests, so every
    worker is idle again when the next connection comes, and the load lasts long enough
    for ``load.sized`` connections -- at least its own duration, at most SIZED_MAX_S.
    On a fast machine nothing changes; an emulated one (TCG) answers 40 times slower, and
    a fixed load would leave the workers busy and its connections too few to tell a split
    from chance."""
    if load.sized <= 0:
        return load
    pause = max(load.pause_s, 2 * request_s)
    per_connection = (request_s + pause) / max(1, load.concurrency)
    duration = min(SIZED_MAX_S, max(load.duration_s, load.sized * per_connection))
    return replace(load, pause_s=round(pause, 4), duration_s=round(duration, 1))


@dataclass(frozen=True)
class Phase:
    what: str                    # one line: what is different in this phase
    server: Server
    load: Load
    sysctls: tuple[tuple[str, int], ...] = ()
    flood: int = 0               # raw SYNs sent to the server before the load
    background: Load | None = None  # other clients at the same time (not in the figures)
    wakeups: bool = False        # count the server's wakeups (less its idle rate) over the load


@dataclass(frozen=True)
class Scenario:
    name: str
    symptom: str                 # what the client sees
    cause: str                   # the root cause below Python
    fix: str
    before: Phase
    fixed: Phase
    expect: tuple[str, ...]      # diagnosis rules that name the cause (any one of them)
    seen: Callable[[PhaseResult], bool]  # was the symptom there (the clients', mostly)?
    # ... said in words (the symptom, as measured); a function where its threshold
    # scales with the phase's stretch
    seen_words: str | Callable[[PhaseResult], str]
    short: tuple[str, str, str] = ("", "", "")  # symptom, cause, fix in a few words (lab list)


def _sys(**kv: int) -> tuple[tuple[str, int], ...]:
    names = {"somaxconn": "net.core.somaxconn", "syncookies": "net.ipv4.tcp_syncookies",
             "max_syn_backlog": "net.ipv4.tcp_max_syn_backlog",
             "abort_on_overflow": "net.ipv4.tcp_abort_on_overflow"}
    return tuple((names[k], v) for k, v in kv.items())


def _errors(c: dict[str, Any], kind: str) -> int:
    return int((c.get("errors") or {}).get(kind, 0))


def waited(p: PhaseResult) -> int:
    """Clients that waited for a SYN retransmit (≥ 1 s) or gave up connecting.  The
    kernel's count of each connect's retransmits (loadgen.syn_retransmits), not its time:
    a busy emulated guest can leave a client a second late to see its handshake done."""
    return int(p.client["syn_retransmitted"] + p.client["connect_timeouts"])


def _waited(p: PhaseResult) -> bool:
    return waited(p) > 0


# 20 ms of blocked event loop per request; the same wait awaited (the loop free meanwhile).
# Two client processes: handshakes on both CPUs at once, as real clients make them.
BLOCKING = Load("/slow?ms=20", concurrency=32, processes=2)
AWAITING = Load("/async?ms=20", concurrency=32, processes=2)
# 160 clients at once, one request each: the SYNs the full queue drops are retransmitted
# together a second later (the kernel batches 1 s timers), and their handshakes then race
# for the queue's few free places.
BURST = Load("/slow?ms=20", concurrency=160, max_requests=160, duration_s=10)
# 150 clients, 3 requests each: 3 waves, whatever the machine's speed.  The first wave's
# connects all come before any request, while the loop is free to accept them; each later
# one comes while the loop serves the wave before it (up to 150 x 2 ms of blocked loop in
# one turn, and the loop accepts only between turns), so it is the later waves that meet
# a full queue.  A bound in seconds gave an emulated guest, where one wave takes 4-5 s,
# only the first.
WAVES = Load("/slow?ms=2", concurrency=150, max_requests=450, duration_s=60)
CPU_MS = 50


def _loop_slow_ms(p: PhaseResult) -> float:
    """event-loop-busy's symptom: /health's p99 at least half the CPU work one request
    blocks the loop for, stretched as the machine is slower (as diagnose()'s
    thresholds are)."""
    return CPU_MS * p.stretch / 2


# syn-flood's clients: one attempt each (3.5 s: their SYN and its retransmits at 1 s and
# 3 s), all over before the flood's requests leave the SYN queue, 7 s after it (run_phase).
FLOODED = Load("/async?ms=1", concurrency=8, duration_s=3.0)
# Light load: every worker idle when a connection comes (a busy one would leave it to the
# others, and the split would even out).
LIGHT = Load("/health", concurrency=1, pause_s=0.005, sized=240)

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        name="accept-overflow",
        short=("timeouts, connects of 1-3 s", "queue overflows: backlog 8, loop blocked",
               "await; backlog 2048"),
        symptom="connection timeouts; connects of 1 s, 2 s, 3 s",
        cause="the accept queue overflows: a small backlog, and an event loop blocked in "
              "every request so accept() comes late",
        fix="await instead of blocking (asyncio.sleep), and uvicorn's default backlog 2048",
        before=Phase("backlog 8; every request blocks the event loop 20 ms (time.sleep)",
                     Server(backlog=8), BLOCKING),
        fixed=Phase("backlog 2048; the handler awaits asyncio.sleep(0.02)",
                    Server(backlog=2048), AWAITING),
        expect=("accept_queue_overflow",),
        seen=_waited,
        seen_words="connects after a SYN retransmit (≥ 1 s), or connect timeouts",
    ),
    Scenario(
        name="syn-flood",
        short=("new clients cannot connect", "SYN flood fills SYN queue, no syncookies",
               "tcp_syncookies=1"),
        symptom="new clients cannot connect at all while a flood goes on",
        cause="a SYN flood fills the SYN queue; with net.ipv4.tcp_syncookies=0 every further "
              "SYN is dropped (TCPReqQFullDrop)",
        fix="net.ipv4.tcp_syncookies=1: past a full SYN queue the kernel answers with a "
            "cookie and keeps no state",
        before=Phase("tcp_syncookies=0; 400 spoofed SYNs fill the SYN queue first",
                     Server(backlog=128), FLOODED,
                     _sys(syncookies=0, max_syn_backlog=4096), flood=400),
        fixed=Phase("tcp_syncookies=1; the same flood",
                    Server(backlog=128), FLOODED,
                    _sys(syncookies=1, max_syn_backlog=4096), flood=400),
        expect=("syn_dropped_synq_full", "syn_queue_full"),
        seen=_waited,
        seen_words="connect timeouts, or connects after a SYN retransmit (≥ 1 s)",
    ),
    Scenario(
        name="somaxconn-clamp",
        short=("fine locally, timeouts in prod", "somaxconn 64 clamps listen(2048)",
               "raise somaxconn"),
        symptom="works locally, connection timeouts in production",
        cause="net.core.somaxconn (64 in 'prod', 4096 'locally') silently clamps "
              "uvicorn's listen(2048): the accept queue holds 64",
        fix="raise net.core.somaxconn (per network namespace: the container's) to the "
            "backlog the server asks for",
        before=Phase("somaxconn 64 ('prod'): uvicorn --backlog 2048 gets 64",
                     Server(backlog=2048), WAVES, _sys(somaxconn=64)),
        fixed=Phase("somaxconn 4096 ('local'): the same uvicorn --backlog 2048",
                    Server(backlog=2048), WAVES, _sys(somaxconn=4096)),
        expect=("backlog_clamped",),
        seen=_waited,
        seen_words="connects after a SYN retransmit (≥ 1 s), or connect timeouts",
    ),
    Scenario(
        name="event-loop-busy",
        short=("slow before handling, no errors", "CPU-bound handler on the event loop",
               "a process pool"),
        symptom="high latency before a request is handled, even for a trivial one; no errors",
        cause=f"a CPU-bound handler ({CPU_MS} ms of CPU) runs on the event loop: accept() and "
              "the reads of new connections wait for it; no overflow (backlog 2048)",
        fix="do the CPU work off the loop (run_in_executor with a process pool)",
        before=Phase(f"GET /health while 2 other clients' requests burn {CPU_MS} ms of CPU "
                     "each on the event loop",
                     Server(backlog=2048), Load("/health", concurrency=4),
                     background=Load(f"/cpu?ms={CPU_MS}", concurrency=2)),
        fixed=Phase("the same, the CPU work in a process pool",
                    Server(backlog=2048, env=(("ACCEPTRACE_DEMO_POOL", "1"),)),
                    Load("/health", concurrency=4),
                    background=Load(f"/cpu-offload?ms={CPU_MS}", concurrency=2)),
        expect=("event_loop_busy", "accept_to_read_slow", "accept_queue_slow"),
        seen=lambda p: float(p.client.get("total_p99_ms") or 0) >= _loop_slow_ms(p),
        seen_words=lambda p: f"/health p99 ≥ {_loop_slow_ms(p):.0f} ms",
    ),
    Scenario(
        name="abort-on-overflow",
        short=("random connection resets", "overflow + tcp_abort_on_overflow=1",
               "stop the overflow"),
        symptom="random connection resets",
        cause="a burst overflows the accept queue of a busy server, and "
              "net.ipv4.tcp_abort_on_overflow=1 makes the kernel answer each final ACK that "
              "finds it full with RST",
        fix="stop the overflow (await instead of blocking, backlog 2048); "
            "tcp_abort_on_overflow=0 alone only turns the resets into stalls",
        before=Phase("tcp_abort_on_overflow=1, backlog 64, handlers that block 20 ms: a "
                     "burst of 160 clients while 4 others keep the loop busy",
                     Server(backlog=64), BURST, _sys(abort_on_overflow=1),
                     background=replace(BLOCKING, concurrency=4, processes=1)),
        fixed=Phase("tcp_abort_on_overflow=1, backlog 2048, the handlers await",
                    Server(backlog=2048), replace(BURST, path="/async?ms=20"),
                    _sys(abort_on_overflow=1),
                    background=replace(AWAITING, concurrency=4, processes=1)),
        expect=("abort_on_overflow",),
        seen=lambda p: _errors(p.client, "reset") > 0,
        seen_words="connections reset",
    ),
    Scenario(
        name="workers",
        short=("uneven split, herd wakeups", "4 workers on one shared socket",
               "SO_REUSEPORT per worker"),
        symptom="the workers share the load unevenly; each connection wakes every worker",
        cause="4 workers on one shared listening socket (one accept queue): every worker is "
              "woken for each connection (the thundering herd), the first to run takes it",
        fix="one SO_REUSEPORT socket per worker (gunicorn --reuse-port): the kernel "
            "spreads connections over the workers' own queues and wakes one worker",
        before=Phase("gunicorn, 4 uvicorn workers on one shared socket",
                     Server(workers=4, gunicorn=True), LIGHT, wakeups=True),
        fixed=Phase("gunicorn --reuse-port: 4 workers, 4 sockets on one port",
                    Server(workers=4, gunicorn=True, reuse_port=True), LIGHT, wakeups=True),
        expect=("workers_uneven", "workers_unbalanced", "shared_accept_queue"),
        seen=lambda p: (p.wakeups_per_connection or 0) >= 3,
        seen_words="≥ 3 worker wakeups per connection (the kernel's count of the workers' "
                   "sleeps)",
    ),
)}


# --- signals: turned into an exception; teardown shielded from them -------------------------------

class LabInterrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived: stop, tear everything down, exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """The first signal raises LabInterrupted -- unless teardown is running, then it is
    kept and raised when the teardown ends; later signals are ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.shield = 0
        self.pending = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.shield:
            self.pending = True
            return
        raise LabInterrupted(signum)


_SIGNALS: _Signals | None = None


@contextmanager
def interruptible() -> Iterator[_Signals]:
    """SIGINT/SIGTERM/SIGHUP raise LabInterrupted inside the block (main thread only)."""
    global _SIGNALS
    state = _Signals()
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, state) for s in sigs}
    _SIGNALS = state
    try:
        yield state
    finally:
        _SIGNALS = None
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def shielded() -> Iterator[None]:
    """Teardown: a signal arriving now is raised after it, not in the middle of it."""
    state = _SIGNALS
    if state is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    state.shield += 1
    try:
        yield
    finally:
        state.shield -= 1
        if not state.shield and state.pending:
            state.pending = False
            assert state.signum is not None
            raise LabInterrupted(state.signum)


# --- the namespace -------------------------------------------------------------------------------

def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UserError("the lab needs iproute2's ip command (apt-get install iproute2)") \
            from None
    if check and res.returncode != 0:
        raise UserError(f"ip {' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res


def _kill_namespace(name: str) -> None:
    """Kill every process in namespace ``name`` and delete it (errors ignored)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for p in pids:
        try:
            os.kill(int(p), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _ip("netns", "del", name, check=False)


def remove_stale_namespaces(netns_dir: Path = Path("/run/netns")) -> list[str]:
    """Namespaces left by a lab that was killed (SIGKILL: no teardown): its pid is in the
    name and that process is gone.  Removed; their names returned."""
    gone = []
    try:
        names = [p.name for p in netns_dir.iterdir() if p.name.startswith(NS_PREFIX)]
    except OSError:
        return []
    for name in names:
        pid_s = name.rsplit("-", 1)[-1]
        if pid_s.isdigit() and not pid_alive(int(pid_s)):
            _kill_namespace(name)
            gone.append(name)
    return gone


class LabNamespace:
    """A network namespace for one phase: loopback up, its sysctls set, removed (with
    every process in it) on leaving the block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ns: NetNamespace | None = None

    def __enter__(self) -> LabNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            self.ns = open_netns(path=self.name)
        except BaseException:
            with shielded():
                _kill_namespace(self.name)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with shielded():
            if self.ns is not None:
                self.ns.close()
                self.ns = None
            _kill_namespace(self.name)

    @property
    def inside(self) -> NetNamespace:
        assert self.ns is not None, "namespace not entered"
        return self.ns

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def set_sysctls(self, values: tuple[tuple[str, int], ...]) -> dict[str, int]:
        """Write each sysctl from a thread inside the namespace (they are per namespace);
        read back what the kernel took."""
        def write() -> dict[str, int]:
            got = {}
            for key, value in values:
                path = Path("/proc/sys") / key.replace(".", "/")
                path.write_text(f"{value}\n")
                got[key] = int(path.read_text().split()[0])
            return got
        return self.inside.call(write)

    def add_flood_link(self) -> None:
        """A veth pair inside the namespace, FLOOD_SERVER_IP on one end, nothing on the
        other, and a fixed neighbour for FLOOD_CLIENT_IP: SYN-ACKs to it vanish."""
        n = self.name
        _ip("-n", n, "link", "add", "lab0", "type", "veth", "peer", "name", "lab1")
        _ip("-n", n, "addr", "add", f"{FLOOD_SERVER_IP}/24", "dev", "lab0")
        _ip("-n", n, "link", "set", "lab0", "up")
        _ip("-n", n, "link", "set", "lab1", "up")
        _ip("-n", n, "neigh", "replace", FLOOD_CLIENT_IP, "lladdr", FLOOD_MAC, "dev", "lab0",
            "nud", "permanent")

    def flood(self, port: int, n: int) -> int:
        """``n`` spoofed SYNs from FLOOD_CLIENT_IP, each from its own port, sent from a raw
        socket opened inside the namespace; returns how many were sent."""
        def send() -> int:
            sent = 0
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
                for sport in random.sample(range(20000, 60000), n):
                    raw.sendto(syn_packet(FLOOD_CLIENT_IP, FLOOD_SERVER_IP, sport, port),
                               (FLOOD_SERVER_IP, 0))
                    sent += 1
            return sent
        return self.inside.call(send)

    def netstat(self) -> dict[str, int]:
        return self.inside.netstat()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 TCP SYN with an MSS option (IP checksum and length: the kernel's)."""
    seq = random.getrandbits(32)
    opts = struct.pack("!BBH", 2, 4, 1460)
    offset = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, 0x02, 64240, 0, 0) + opts
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


# --- processes: the server, the tracer, the load -------------------------------------------------

def _stop_group(proc: subprocess.Popen[Any], first: int = signal.SIGTERM,
                timeout: float = 10.0) -> None:
    """``first`` to the process group, SIGKILL after ``timeout``; reaps the leader."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, first)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (workers)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class LabServer:
    """The phase's server in the namespace, in its own process group."""

    def __init__(self, lns: LabNamespace, server: Server, port: int) -> None:
        self.lns = lns
        self.server = server
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> LabServer:
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONWARNINGS": "ignore::DeprecationWarning", **dict(self.server.env)}
        self.proc = subprocess.Popen(
            self.lns.exec_argv(self.server.argv(self.port)), env=env,
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        return self

    def __exit__(self, *exc: object) -> None:
        with shielded():
            if self.proc is not None:
                _stop_group(self.proc)
            if self._log is not None:
                self._log.close()

    def log(self) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Until every worker said "Application startup complete" and the port has as many
        listening sockets as it will (one, or one per worker with --reuse-port)."""
        assert self.proc is not None
        want_ready = self.server.workers if self.server.gunicorn else 1
        want_sockets = self.server.workers if self.server.reuse_port else 1
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"the lab's server exited ({self.proc.returncode}): "
                                + _tail(self.log()))
            log = self.log()
            socks = self.lns.inside.listening_sockets(self.port)
            if log.count("Application startup complete") >= want_ready \
                    and len(socks) >= want_sockets:
                return
            if time.monotonic() >= end:
                raise UserError(f"the lab's server was not ready after {timeout:g} s: "
                                + _tail(log))
            time.sleep(0.1)


def _tail(text: str, lines: int = 5) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


class TracerProcess:
    """``acceptrace --netns NS --port P --json FILE``, a child in its own process group;
    ``start()`` returns once it says it is tracing, ``stop()`` sends SIGINT (the run is
    written) and returns its exit code."""

    def __init__(self, ns_name: str, port: int, json_path: Path, backend: str,
                 log_path: Path) -> None:
        self.argv = [sys.executable, "-m", "acceptrace", "--netns", ns_name, "--port", str(port),
                     "--json", str(json_path), "--no-tui", "--interval", "1",
                     "--backend", backend]
        self.json_path = json_path
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._tracing = threading.Event()
        self._reader: threading.Thread | None = None
        self._stdout: list[str] = []   # the summary it prints at the end

    def command(self) -> str:
        return "acceptrace " + " ".join(self.argv[3:])

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("acceptrace: tracing "):
                self._tracing.set()
        self._tracing.set()

    def __enter__(self) -> TracerProcess:
        self.json_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="tracer stderr", daemon=True)
        self._reader.start()
        out = self.proc.stdout
        threading.Thread(target=lambda: self._stdout.extend(out or []),
                         name="tracer stdout", daemon=True).start()
        return self

    def wait_tracing(self, timeout: float = 300.0) -> None:
        assert self.proc is not None
        if not self._tracing.wait(timeout) or self.proc.poll() is not None:
            raise UserError("acceptrace did not start tracing: " + _tail("".join(self.lines)))

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        with shielded():
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _stop_group(self.proc, signal.SIGKILL)
                rc = self.proc.returncode if self.proc.returncode is not None else -9
            if self._reader is not None:
                self._reader.join(5)
            try:
                self.log_path.write_text("$ " + self.command() + "\n" + "".join(self.lines)
                                         + "".join(self._stdout))
            except OSError:
                pass
            return rc

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.stop()


class LoadProcess:
    """The load generator inside the namespace, in its own process group."""

    def __init__(self, lns: LabNamespace, load: Load, port: int, hold: bool = False) -> None:
        self.load = load
        self.proc = subprocess.Popen(
            lns.exec_argv(load.argv(port, hold)),
            stdin=subprocess.PIPE if hold else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until a held load generator has started (its 'ready' line on stderr), read
        byte by byte so that the rest of stderr stays for result()."""
        assert self.proc.stderr is not None
        fd, line, end = self.proc.stderr.fileno(), b"", time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], min(left, 0.5))[0]:
                if left <= 0 or self.proc.poll() is not None:
                    raise UserError("the load generator did not start: "
                                    + line.decode(errors="replace"))
                continue
            byte = os.read(fd, 1)
            if not byte:
                raise UserError("the load generator exited before it started: "
                                + line.decode(errors="replace"))
            line += byte

    def go(self) -> None:
        """Let a held load generator start its clients."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        """Its JSON summary, once it ended (it bounds its own run time)."""
        limit = self.load.longest_s + 30
        try:
            out, errs = self.proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            raise UserError(f"the load generator did not finish within {limit:g} s") from None
        finally:
            self.kill()
        try:
            return dict(json.loads(out.strip().splitlines()[-1]))
        except (IndexError, ValueError):
            raise UserError("the load generator printed no summary: " + _tail(errs)) from None

    def kill(self) -> None:
        with shielded():
            _stop_group(self.proc, signal.SIGKILL, 1)


def run_loads(lns: LabNamespace, load: Load, background: Load | None, port: int,
              before_first: Callable[[], None] | None = None,
              ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The phase's clients (and, at the same time, its background clients); both summaries.
    ``before_first`` runs once the clients' process has started, right before their
    first request (a slow machine takes seconds to start a Python process)."""
    procs: list[LoadProcess] = []
    try:
        if background is not None:
            procs.append(LoadProcess(lns, background, port))
            time.sleep(BACKGROUND_LEAD_S)   # the server busy before the measured clients come
        main = LoadProcess(lns, load, port, hold=before_first is not None)
        procs.append(main)
        if before_first is not None:
            main.wait_ready()
            before_first()
            main.go()
        results = [p.result() for p in reversed(procs)]
    finally:
        for p in procs:
            p.kill()
    return results[0], (results[1] if background is not None else None)


def group_wakeups(pgid: int, proc: Path = Path("/proc")) -> int:
    """How often the processes of group ``pgid`` went to sleep and were woken again
    (the kernel's voluntary context switches, every thread summed)."""
    total = 0
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[2]) != pgid:   # field 5: pgrp
                continue
            for task in (d / "task").iterdir():
                for line in (task / "status").read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total


def idle_wakeups(pgid: int, load_s: float) -> float:
    """The server's wakeups per second while no client comes (its own timers: gunicorn's
    heartbeat, the event loop's), counted over a quarter of the load's duration within
    IDLE_S: the share of the load's wakeups that is not the load's."""
    spell = min(IDLE_S[1], max(IDLE_S[0], load_s / 4))
    n = group_wakeups(pgid)
    time.sleep(spell)
    return (group_wakeups(pgid) - n) / spell


def probe_request_s(lns: LabNamespace, load: Load, port: int) -> float:
    """The median time of PROBE_REQUESTS requests of ``load``'s path, one at a time."""
    probe = Load(load.path, concurrency=1, max_requests=PROBE_REQUESTS, duration_s=120,
                 timeout_s=30)
    out = LoadProcess(lns, probe, port).result()
    p50 = out.get("total_p50_ms")
    if not isinstance(p50, (int, float)) or out.get("completed", 0) < PROBE_REQUESTS // 2:
        raise UserError(f"the server answered too few of {PROBE_REQUESTS} timing requests: "
                        f"{out}")
    return float(p50) / 1000


def settle(lns: LabNamespace, port: int, timeout: float, quiet_s: float = 0.6) -> int:
    """Until the accept path is quiet: the namespace's counters have not moved for
    ``quiet_s`` and nothing waits in the port's accept queues (so every connection the
    kernel queued was accepted before the tracer stops).  How many still waited there
    when ``timeout`` ran out: 0 once quiet."""
    end = time.monotonic() + timeout
    last: tuple[int, ...] | None = None
    since = time.monotonic()
    queued = 0
    while time.monotonic() < end:
        stats, counters = lns.inside.read_together(port)
        now = tuple(counters.get(k, 0) for k in SETTLE_KEYS)
        queued = sum(s.recv_q for s in stats.values())
        if now != last or queued:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return 0
        time.sleep(0.1)
    return queued


# --- one phase, one scenario ---------------------------------------------------------------------

@dataclass
class PhaseResult:
    label: str                   # "before" | "fixed"
    phase: Phase
    namespace: str
    run: Run
    client: dict[str, Any]       # the load generator's summary
    netstat: dict[str, int]      # the namespace's own counters: deltas over the load
    sysctls: dict[str, int]      # what the namespace's sysctls were
    flood_sent: int = 0
    findings: list[Finding] = field(default_factory=list)
    command: str = ""
    background: dict[str, Any] | None = None  # the background clients' summary
    wakeups: int | None = None   # the server's processes: sleeps woken over the load, less
                                 # the idle rate (idle_wakeups_per_s) over as long
    idle_wakeups_per_s: float | None = None
    load: Load | None = None     # the load as run (a sized one fitted to the server)
    background_load: Load | None = None  # the background load as run
    stretch: float = 1.0         # how much slower than a real machine (stretch_factor)

    @property
    def rules(self) -> list[str]:
        return [f.rule for f in self.findings]

    @property
    def wakeups_per_connection(self) -> float | None:
        n = self.netstat.get("TcpPassiveOpens", 0)
        return None if self.wakeups is None or not n else self.wakeups / n


@dataclass
class ScenarioResult:
    scenario: Scenario
    before: PhaseResult
    fixed: PhaseResult
    out_dir: Path

    @property
    def named(self) -> list[str]:
        """The expected rules the diagnosis of the first run gave."""
        return [r for r in self.before.rules if r in self.scenario.expect]

    @property
    def ok(self) -> bool:
        return bool(self.named)

    @property
    def seen(self) -> bool:
        return self.scenario.seen(self.before)

    @property
    def seen_words(self) -> str:
        """The symptom looked for, in words, with the threshold this run used."""
        w = self.scenario.seen_words
        return w if isinstance(w, str) else w(self.before)

    @property
    def fix_cleared(self) -> bool:
        """The fixed run no longer names the cause."""
        return not any(r in self.scenario.expect for r in self.fixed.rules)


def run_phase(sc: Scenario, label: str, phase: Phase, out_dir: Path, backend: str,
              say: Callable[[str], None]) -> PhaseResult:
    name = f"{NS_PREFIX}{sc.name}-{label}-{os.getpid()}"
    json_path = out_dir / ("run.json" if label == "before" else "fixed.json")
    with LabNamespace(name) as lns:
        sysctls = lns.set_sysctls(phase.sysctls)
        if phase.flood:
            lns.add_flood_link()
        say(f"{label}: {phase.what} — namespace {name}"
            + (", " + ", ".join(f"{k}={v}" for k, v in sysctls.items()) if sysctls else ""))
        with LabServer(lns, phase.server, LAB_PORT) as srv:
            srv.wait_ready()
            health_s = probe_request_s(lns, Load("/health", concurrency=1), LAB_PORT)
            stretch = stretch_factor(health_s)
            load = stretch_load(phase.load, stretch)
            background = (None if phase.background is None
                          else stretch_load(phase.background, stretch))
            if stretch != 1.0:
                say(f"{label}: the server answers GET /health in {fmt_us(health_s * 1e6)} "
                    f"(median of {PROBE_REQUESTS}), {stretch:g} times as long as on a real "
                    "machine: handler times, pauses, timeouts and the diagnosis's 'slow' "
                    "thresholds are stretched as much")
            if load.sized:
                request_s = (health_s if load.path == "/health"
                             else probe_request_s(lns, load, LAB_PORT))
                load = size_load(load, request_s)
                say(f"{label}: the server answers in {fmt_us(request_s * 1e6)} (median of "
                    f"{PROBE_REQUESTS}): the load is sized to that")
            with TracerProcess(name, LAB_PORT, json_path, backend,
                               out_dir / f"{json_path.stem}.log") as tracer:
                tracer.wait_tracing()
                before = lns.netstat()
                sent = 0

                def flood() -> None:
                    # The flood's requests leave the SYN queue after their second SYN-ACK
                    # retransmit (7 s: a queue this full keeps 2 retries, inet_csk
                    # reqsk_timer_handler): the clients' SYNs must come right after it.
                    nonlocal sent
                    sent = lns.flood(LAB_PORT, phase.flood)

                say(f"{label}: load: {load.describe()}"
                    + (f", right after {phase.flood} spoofed SYNs" if phase.flood else "")
                    + (f"; meanwhile {background.describe()}" if background else ""))
                assert srv.proc is not None
                idle_rate = (idle_wakeups(srv.proc.pid, load.duration_s) if phase.wakeups
                             else None)
                woken = group_wakeups(srv.proc.pid)
                t0 = time.monotonic()
                client, bg_client = run_loads(lns, load, background, LAB_PORT,
                                              flood if phase.flood else None)
                elapsed = time.monotonic() - t0
                woken = group_wakeups(srv.proc.pid) - woken
                wait_s = SETTLE_S * stretch
                if left := settle(lns, LAB_PORT, wait_s):
                    say(f"{label}: {left} connection(s) still in the accept queue after "
                        f"{wait_s:g} s: acceptrace stops with them queued, not accepted")
                after = lns.netstat()
                rc = tracer.stop()
            if rc != 0:
                raise UserError(f"acceptrace exited with {rc}: "
                                + _tail("".join(tracer.lines)))
    try:
        run = Run.read(json_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"acceptrace wrote no readable run to {json_path}: {exc}") from None
    return PhaseResult(
        label=label, phase=phase, namespace=name, run=run, client=client,
        netstat=procnet.counter_deltas(before, after, NETSTAT_KEYS), sysctls=sysctls,
        flood_sent=sent, findings=diagnose(run, stretch), command=tracer.command(),
        background=bg_client, background_load=background, stretch=stretch,
        wakeups=(None if idle_rate is None else max(0, round(woken - idle_rate * elapsed))),
        idle_wakeups_per_s=idle_rate, load=load)


def run_scenario(sc: Scenario, out_root: Path, backend: str = "auto",
                 say: Callable[[str], None] = lambda _m: None) -> ScenarioResult:
    """Both phases of ``sc``; writes run.json, fixed.json, lab.json and report.html."""
    out_dir = out_root / sc.name
    out_dir.mkdir(parents=True, exist_ok=True)
    before = run_phase(sc, "before", sc.before, out_dir, backend, say)
    fixed = run_phase(sc, "fixed", sc.fixed, out_dir, backend, say)
    res = ScenarioResult(sc, before, fixed, out_dir)
    write_results(res)
    return res


def write_results(res: ScenarioResult) -> None:
    from .html import render_html_compare  # noqa: PLC0415 - only the lab writes it

    sc = res.scenario

    def phase(p: PhaseResult) -> dict[str, Any]:
        return {"what": p.phase.what, "server": p.phase.server.describe(),
                "load": (p.load or p.phase.load).describe(), "namespace": p.namespace,
                "sysctls": p.sysctls, "flood_sent": p.flood_sent, "client": p.client,
                "stretch": p.stretch,
                "background": p.background, "server_wakeups": p.wakeups,
                "server_idle_wakeups_per_s": p.idle_wakeups_per_s,
                "netstat": p.netstat, "rules": p.rules, "tracer": p.command}

    lab = {"scenario": sc.name, "symptom": sc.symptom, "cause": sc.cause, "fix": sc.fix,
           "expect": list(sc.expect), "named": res.named, "ok": res.ok,
           "symptom_seen": res.seen, "fix_cleared": res.fix_cleared,
           "before": phase(res.before), "fixed": phase(res.fixed)}
    write_text_atomic(res.out_dir / "lab.json", json.dumps(lab, indent=1) + "\n")
    write_text_atomic(res.out_dir / "report.html", render_html_compare(
        res.before.run, res.fixed.run, ("before", "fixed"),
        title=f"acceptrace lab: {sc.name}",
        subtitle=f"{sc.symptom} — {sc.cause}. Fix: {sc.fix}.",
        slowness=(res.before.stretch, res.fixed.stretch)))


# --- text output ---------------------------------------------------------------------------------

def _ms(v: Any) -> str:
    return "n/a" if v is None else fmt_us(float(v) * 1000)


def _pct(run: Run, stage: str, q: float) -> str:
    h = run.stages.get(stage)
    return "n/a" if h is None or not h.count else fmt_us(h.percentile(q))


def _kernel(p: PhaseResult, key: str) -> str:
    return f"{p.netstat.get(key, 0):,}"


def render_list() -> RenderableType:
    """One line per scenario: the symptom, its cause, the fix."""
    t = Table(title="acceptrace lab scenarios (sudo acceptrace lab run NAME|all)",
              title_justify="left", box=None, pad_edge=False)
    for col in ("scenario", "symptom", "cause", "fix"):
        t.add_column(col, no_wrap=True, style="bold" if col == "scenario" else "")
    for sc in SCENARIOS.values():
        t.add_row(sc.name, *sc.short)
    return Group(t, Text("details: docs/lab.md; each scenario's full story is printed "
                         "when it runs", style="dim"))


def render_result(res: ScenarioResult) -> RenderableType:
    """The two phases side by side: clients, acceptrace, the kernel, the diagnosis."""
    sc, b, f = res.scenario, res.before, res.fixed
    t = Table(title=f"{sc.name}: {sc.symptom}", title_justify="left", title_style="bold")
    t.add_column("", no_wrap=True)
    t.add_column(f"before: {b.phase.what}", ratio=1)
    t.add_column(f"fixed: {f.phase.what}", ratio=1)

    def row(label: str, get: Callable[[PhaseResult], str], style: str = "") -> None:
        t.add_row(Text(label, style=style), get(b), get(f))

    def section(name: str) -> None:
        t.add_row(Text(name, style="bold underline"), "", "")

    section("clients")
    row("server", lambda p: p.phase.server.describe())
    row("load", lambda p: (p.load or p.phase.load).describe()
        + (f" + {p.flood_sent} spoofed SYNs" if p.flood_sent else ""))
    if b.stretch != 1.0 or f.stretch != 1.0:
        row("slow machine", lambda p: f"GET /health took {p.stretch:g}× a real machine's: "
            "handler times, pauses, timeouts, 'slow' thresholds stretched as much")
    row("requests ok / sent", lambda p: f"{p.client['completed']:,} / {p.client['attempted']:,}")
    row("connect timeouts", lambda p: f"{p.client['connect_timeouts']:,}")
    row("resets", lambda p: f"{_errors(p.client, 'reset'):,}")
    row("other errors", lambda p: ", ".join(
        f"{k} {v}" for k, v in (p.client.get("errors") or {}).items() if k != "reset"
        and not (k == "timeout" and v == p.client["connect_timeouts"])) or "none")
    row("connect p50 / p99 / max", lambda p: f"{_ms(p.client['connect_p50_ms'])} / "
        f"{_ms(p.client['connect_p99_ms'])} / {_ms(p.client['connect_max_ms'])}")
    row("request p50 / p99", lambda p: f"{_ms(p.client['total_p50_ms'])} / "
        f"{_ms(p.client['total_p99_ms'])}")
    row("connects after a SYN retransmit", lambda p: f"{p.client['syn_retransmitted']:,} "
        f"({p.client['slow_connects_1s']:,} took ≥ 1 s)")
    if b.background or f.background:
        row("meanwhile (not counted above)", lambda p: "" if p.background is None else
            f"{p.background_load.describe() if p.background_load else ''}: "
            f"{p.background['completed']:,} ok, p50 {_ms(p.background['total_p50_ms'])}")
    section("acceptrace")
    row("accepted", lambda p: fmt_count(p.run.connections.get("accepted")))
    row("listen overflows", lambda p: fmt_count(p.run.drops.get("listen_overflow")))
    row("SYNs / ACKs dropped (queue full)", lambda p: f"{fmt_count(p.run.drops.get('syn_dropped'))}"
        f" / {fmt_count(p.run.drops.get('ack_dropped'))}")
    row("came via syncookie", lambda p: fmt_count(p.run.drops.get("syncookies")))
    row("backlog / queue depth max", lambda p: f"{fmt_count(p.run.queues.backlog)} / "
        + (fmt_count(int(p.run.queues.accept_queue_depth.max))
           if p.run.queues.accept_queue_depth is not None
           and p.run.queues.accept_queue_depth.max is not None else "n/a"))
    def stage_row(stage: str, label: str) -> None:
        row(f"{label} p50 / p99",
            lambda p: f"{_pct(p.run, stage, 0.5)} / {_pct(p.run, stage, 0.99)}")

    stage_row("accept_queue", "accept queue")
    stage_row("accept_to_read", "accept() → read")
    stage_row("read_to_dispatch", "read → dispatch")
    row("accepts per process", lambda p: ", ".join(
        f"{pc.accepted:,}" for pc in p.run.processes) or "none")
    section("kernel (the namespace's own)")
    row("ListenOverflows / ListenDrops", lambda p: f"{_kernel(p, 'TcpExtListenOverflows')} / "
        f"{_kernel(p, 'TcpExtListenDrops')}")
    row("TCPReqQFullDrop / SyncookiesSent", lambda p: f"{_kernel(p, 'TcpExtTCPReqQFullDrop')} / "
        f"{_kernel(p, 'TcpExtSyncookiesSent')}")
    row("PassiveOpens / OutRsts", lambda p: f"{_kernel(p, 'TcpPassiveOpens')} / "
        f"{_kernel(p, 'TcpOutRsts')}")
    row("server wakeups per connection", lambda p: "n/a" if p.wakeups_per_connection is None
        else f"{p.wakeups_per_connection:.1f} ({p.wakeups:,} sleeps ended, less "
        f"{p.idle_wakeups_per_s or 0:.0f}/s idle)")
    verdict = Text.assemble(
        ("✔ the expected cause was named" if res.ok else "✘ the expected cause was NOT named",
         "bold green" if res.ok else "bold red"),
        f" [{', '.join(res.named)}]" if res.named else f" ({' or '.join(sc.expect)} expected)",
        ("; after the fix it is gone" if res.fix_cleared else "; after the fix it is still "
         "named", "green" if res.fix_cleared else "yellow"))
    files = Text(f"{res.out_dir}/: run.json fixed.json report.html lab.json  (compare: "
                 f"acceptrace report {res.out_dir}/run.json {res.out_dir}/fixed.json)",
                 style="dim")
    return Group(t, Text("diagnosis before", style="bold"), _findings(b.findings, sc.expect),
                 Text("diagnosis after the fix", style="bold"), _findings(f.findings, sc.expect),
                 verdict, files, Text(""))


def _findings(fs: list[Finding], expect: tuple[str, ...]) -> Text:
    """The findings, the expected cause's in bold with its rule name."""
    out = Text()
    for i, f in enumerate(fs):
        style = {"critical": "red", "warning": "yellow"}.get(f.severity, "cyan")
        out.append(("\n" if i else "") + "  • ", style=style)
        out.append(f.text, style="bold" if f.rule in expect else "")
        if f.rule in expect:
            out.append(f"  [{f.rule}]", style="dim")
    return out


def render_all(results: list[ScenarioResult], failed: dict[str, str]) -> RenderableType:
    t = Table(title="acceptrace lab: every scenario", title_justify="left")
    for col in ("scenario", "symptom seen by the clients", "cause named by acceptrace",
                "after the fix", "as expected?"):
        t.add_column(col, ratio=1 if col != "scenario" else None)
    for res in results:
        sc = res.scenario
        t.add_row(sc.name,
                  Text(("yes: " if res.seen else "no: ") + res.seen_words,
                       style="" if res.seen else "yellow"),
                  Text(", ".join(res.named) or f"no ({' or '.join(sc.expect)} expected)",
                       style="" if res.ok else "red"),
                  Text("cause cleared" if res.fix_cleared else "cause still named",
                       style="green" if res.fix_cleared else "yellow"),
                  Text("yes" if res.ok else "NO", style="bold green" if res.ok else "bold red"))
    for name, why in failed.items():
        t.add_row(name, "", Text(f"did not run: {why}", style="red"), "",
                  Text("NO", style="bold red"))
    return t


# --- the command ---------------------------------------------------------------------------------

def scenario_names(name: str) -> list[str]:
    if name == "all":
        return list(SCENARIOS)
    if name not in SCENARIOS:
        raise UserError(f"no lab scenario {name!r}: one of {', '.join(SCENARIOS)}, or all")
    return [name]


def check_tools() -> None:
    """Root, ip, and the servers the scenarios start; one line if something is missing."""
    from .selection import require_root  # noqa: PLC0415

    require_root()
    if shutil.which("ip") is None:
        raise UserError("the lab needs iproute2's ip command (apt-get install iproute2)")
    for mod in ("uvicorn", "fastapi", "gunicorn"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"the lab needs {mod}: run make setup") from None


def run_lab(name: str, out_root: Path, backend: str, out: Console, err: Console) -> int:
    """`acceptrace lab run NAME|all`: 0 if every scenario's cause was named, else 1;
    130/143/129 when a signal stopped it (after tearing everything down)."""
    names = scenario_names(name)
    check_tools()
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_root)
        probe.close()
    except OSError as exc:
        raise UserError(f"--out {out_root}: cannot write there ({exc.strerror or exc})") \
            from None
    results: list[ScenarioResult] = []
    failed: dict[str, str] = {}

    def say(msg: str) -> None:
        err.print(f"acceptrace lab: {msg}", style="dim")

    try:
        with interruptible():
            for gone in remove_stale_namespaces():
                say(f"removed {gone}, left by a lab that was killed")
            for n in names:
                sc = SCENARIOS[n]
                err.print(f"acceptrace lab: {n}: {sc.symptom} ← {sc.cause}", style="bold")
                t0 = time.monotonic()
                try:
                    res = run_scenario(sc, out_root, backend, say)
                except UserError as exc:
                    if len(names) == 1:
                        raise
                    failed[n] = str(exc)
                    err.print(f"acceptrace lab: {n}: {exc}", style="red")
                    continue
                results.append(res)
                out.print(render_result(res))
                say(f"{n}: {time.monotonic() - t0:.0f} s")
    except LabInterrupted as exc:
        err.print(f"acceptrace lab: stopped by {signal.Signals(exc.signum).name}; "
                  "servers, load, tracer and namespaces removed", style="yellow")
        return 128 + exc.signum
    if len(names) > 1:
        out.print(render_all(results, failed))
    bad = [r.scenario.name for r in results if not r.ok] + list(failed)
    if bad:
        err.print(f"acceptrace lab: the expected cause was not named: {', '.join(bad)}",
                  style="bold red")
        return 1
    return 0
