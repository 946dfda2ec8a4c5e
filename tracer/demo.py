"""Starting servers (the demo target, test and benchmark servers) and `acceptrace demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from rich.console import Console

from . import procnet
from .errors import UserError

DEMO_APP = "acceptrace.demo_app:app"
DEMO_BACKLOG = 8
DEMO_BLOCK_MS = 20
DEMO_CONCURRENCY = 64


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A uvicorn server in its own process group; never outlives the with-block."""

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
        self.port = port
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
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        import tempfile  # noqa: PLC0415

        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=self._stderr,
            start_new_session=True,
        )
        return self

    def stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def wait_listening(self, timeout: float = 30.0) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: {self.stderr_text().strip()}"
                )
            if procnet.listening_sockets(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not listening on {self.port} after {timeout:g} s: "
                           + self.stderr_text().strip())

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._stderr is not None:
            self._stderr.close()


def run_demo(*, duration_s: float, json_path: Path | None, out: Console, err: Console) -> None:
    """Trace the demo target under load: the accept queue overflows within seconds."""
    from .runner import TraceOptions, require_root, trace  # noqa: PLC0415

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
             "--concurrency", str(DEMO_CONCURRENCY)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )

    with server:
        try:
            server.wait_listening()
        except RuntimeError as exc:
            raise UserError(f"the demo server did not start: {exc}") from exc
        try:
            trace(TraceOptions(port=port, duration_s=duration_s, json_path=json_path), out, err,
                  on_started=start_load)
        finally:
            if load is not None:
                try:
                    stdout, _ = load.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    load.kill()
                    stdout, _ = load.communicate()
                _print_load(stdout, err)


def _print_load(stdout: str, err: Console) -> None:
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return
    errors = ", ".join(f"{k} {v}" for k, v in res.get("errors", {}).items()) or "none"
    err.print(
        f"load generator: {res['completed']} of {res['attempted']} requests completed "
        f"(errors: {errors}); connect p50 {res['connect_p50_ms']} ms, "
        f"max {res['connect_max_ms']} ms; {res['slow_connects_1s']} connects took ≥ 1 s "
        "(their first SYN was dropped and retransmitted)"
    )
