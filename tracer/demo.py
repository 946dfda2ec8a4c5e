"""Starting servers (the demo target, test and benchmark servers) and `acceptrace demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from rich.console import Console

from . import procnet
from .errors import UserError

DEMO_APP = "acceptrace.demo_app:app"
DEMO_BACKLOG = 8
DEMO_BLOCK_MS = 20
DEMO_CONCURRENCY = 64
# Dropped SYNs make connects of 1 s, 2-3 s, 4 s (see loadgen); cut longer ones
# short so the load ends soon after the trace.
DEMO_CONNECT_TIMEOUT_S = 4.5


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just handed out on ``host`` (free now, not reserved)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerStartError(RuntimeError):
    """The server exited, or did not listen in time; the message has its stderr."""


def socket_inodes_of(pid: int, proc: Path = Path("/proc")) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (``/proc/PID/fd -> socket:[N]``)."""
    out: set[int] = set()
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return out
    for name in names:
        try:
            link = os.readlink(fd_dir / name)
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


class ServerProcess:
    """``python -m uvicorn APP`` in its own process group; never outlives the with-block.

    ``wait_listening()`` returns once the server's own socket is in LISTEN on
    the port (/proc/net/tcp{,6} state 0A, inode among the server's fds);
    ``stop()`` (also on leaving the with-block, whatever happened in it) sends
    SIGTERM to the group, then SIGKILL after ``timeout``.
    """

    def __init__(
        self,
        app: str = DEMO_APP,
        *,
        port: int,
        host: str = "127.0.0.1",
        backlog: int = 2048,
        workers: int | None = None,
        loop: str | None = None,
        http: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if loop not in (None, "auto", "uvloop", "asyncio"):
            raise ValueError(f"loop must be uvloop, asyncio or auto, not {loop!r}")
        if http not in (None, "auto", "httptools", "h11"):
            raise ValueError(f"http must be httptools, h11 or auto, not {http!r}")
        self.port = port
        self.host = host
        self.argv = [
            sys.executable, "-m", "uvicorn", app, "--host", host, "--port", str(port),
            "--backlog", str(backlog), "--log-level", "warning", "--no-access-log",
        ]
        if workers:
            self.argv += ["--workers", str(workers)]
        if loop:
            self.argv += ["--loop", loop]
        if http:
            self.argv += ["--http", http]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("server not started")
        return self.proc.pid

    def start(self) -> ServerProcess:
        if self.proc is not None:
            raise RuntimeError("server already started")
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self._stderr, start_new_session=True,  # its own session and process group
        )
        return self

    def stderr_text(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def _fail(self, what: str) -> ServerStartError:
        err = self.stderr_text().strip()
        return ServerStartError(f"{what}: {err}" if err else f"{what} (no stderr)")

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the server listens on its port; ServerStartError if it exits or times out."""
        if self.proc is None:
            raise RuntimeError("server not started")
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"server {self.argv[3]} exited with {self.proc.returncode}")
            listening = {s.inode for s in procnet.listening_sockets(self.port)}
            if listening & socket_inodes_of(self.proc.pid):
                return
            if time.monotonic() >= end:
                raise self._fail(
                    f"server {self.argv[3]} not listening on port {self.port} after {timeout:g} s")
            time.sleep(0.05)

    def _group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_group(self, timeout: float) -> bool:
        """Reap the leader and wait for the rest of the group; True if all are gone."""
        assert self.proc is not None
        end = time.monotonic() + timeout
        try:
            self.proc.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return False
        while self._group_alive():
            if time.monotonic() >= end:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout``; returns when all are gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None or self._group_alive():
            self._signal_group(signal.SIGTERM)
            if not self._wait_group(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait_group(10.0)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            if self._stderr is not None:
                self._stderr.close()


def run_demo(*, duration_s: float, err: Console,
             trace: Callable[[int, Callable[[], None], Callable[[object], None]], object]
             ) -> None:
    """Trace the demo target under load: the accept queue overflows within seconds.

    ``trace(port, on_started, before_summary)`` runs the tracer (the CLI hands in
    runner.trace): ``on_started`` starts the load; ``before_summary`` says what its
    clients saw, before the run's summary and diagnosis (the last word)."""
    from .selection import require_root  # noqa: PLC0415

    require_root()
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: F401, PLC0415
    except ImportError as exc:
        raise UserError(f"the demo needs uvicorn and fastapi ({exc}): run make setup") from exc
    port = free_port()
    load: subprocess.Popen[str] | None = None
    server = ServerProcess(port=port, backlog=DEMO_BACKLOG,
                           env={"ACCEPTRACE_DEMO_BLOCK_MS": str(DEMO_BLOCK_MS)})
    err.print(
        f"acceptrace demo: uvicorn+FastAPI on 127.0.0.1:{port}, listen backlog {DEMO_BACKLOG}, "
        f"each request blocks the event loop {DEMO_BLOCK_MS} ms; "
        f"{DEMO_CONCURRENCY} clients open a new connection per request"
    )

    def start_load() -> None:
        nonlocal load
        load = subprocess.Popen(
            [sys.executable, "-m", "acceptrace.loadgen", "--port", str(port),
             "--duration", f"{max(1.0, duration_s - 1.5):g}",
             "--concurrency", str(DEMO_CONCURRENCY),
             "--connect-timeout", f"{DEMO_CONNECT_TIMEOUT_S:g}", "--timeout", "5"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )

    def finish_load(_run: object = None) -> None:
        nonlocal load
        if load is None:
            return
        proc, load = load, None
        try:
            stdout, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        _print_load(stdout, err)

    with server:
        try:
            server.wait_listening()
        except ServerStartError as exc:
            raise UserError(f"the demo server did not start: {exc}") from exc
        try:
            trace(port, start_load, finish_load)
        finally:
            finish_load()   # the trace failed before its summary


def _print_load(stdout: str, err: Console) -> None:
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return
    errors = ", ".join(f"{k} {v}" for k, v in res.get("errors", {}).items()) or "none"
    connect_timeouts = int(res.get("connect_timeouts") or 0)
    if connect_timeouts:
        errors += (f"; {connect_timeouts} connects had no SYN-ACK within "
                   f"{DEMO_CONNECT_TIMEOUT_S:g} s: their SYN and every retransmit were dropped")
    if res.get("errors", {}).get("timeout", 0) > connect_timeouts:
        errors += (f"; {res['errors']['timeout'] - connect_timeouts} connected but had "
                   "no response within 5 s")
    err.print(
        f"load generator: {res['completed']} of {res['attempted']} requests completed "
        f"(errors: {errors}); connect p50 {res['connect_p50_ms']} ms, "
        f"max {res['connect_max_ms']} ms; {res['slow_connects_1s']} connects took ≥ 1 s, "
        f"{res['syn_retransmitted']} sent their SYN again (the first was dropped)"
    )
