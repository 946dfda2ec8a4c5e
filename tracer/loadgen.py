"""The bundled load generator: one new TCP connection per HTTP request.

Each request connects, sends a minimal ``GET`` with ``Connection: close``,
reads the response to EOF and closes.  Bounded: it starts no request after
``duration_s`` or ``max_requests``, and every request is bounded by its
connect and read timeouts, so a run lasts at most ``duration_s +
connect_timeout_s + timeout_s``.  Meant for loopback targets (the demo, the
tests, the benchmarks).

The clients' first connects are issued together, one ``connect()`` after another in
a tight loop before the event loop runs any client (``_start_connects``): ``N``
clients are a burst of ``N`` SYNs even where Python is slow (an emulated VM), and
not a trickle paced by the event loop's own work for each new connection.  Every
later connect takes the same path, one at a time: a non-blocking ``connect()`` to
the address resolved once, finished when the socket is writable.

Connect times show the cost of dropped SYNs: a client whose SYN a full
listener dropped waits for its retransmit, 1 s later.  Where the clients' own
process is slow to run (an emulated VM's busy CPUs) a connect can also take a
second with no SYN lost, so each connect's SYN retransmits are read from the
kernel as well (``TCP_INFO``'s ``tcpi_total_retrans`` when the handshake is done:
``syn_retransmitted``).  Later retransmits
back off exponentially (connects of 1 s, 3 s, 7 s ...), or, on kernels with
``net.ipv4.tcp_syn_linear_timeouts`` (6.18 here: 4), come every second for
the first 4 retries (connects of 1 s, 2 s, 3 s, 4 s, then 6 s, 10 s ...).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import multiprocessing
import os
import socket
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

ERROR_KINDS = ("refused", "reset", "timeout", "http", "other")
MAX_REQUESTS_CAP = 10_000_000  # a count bound even without max_requests


@dataclass
class LoadResult:
    attempted: int = 0
    completed: int = 0  # 2xx responses
    # refused / reset / timeout / http (no 2xx response) / other (any other OSError)
    errors: dict[str, int] = field(default_factory=dict)
    connect_timeouts: int = 0  # of errors["timeout"]: no SYN-ACK within connect_timeout_s
    syn_retransmitted: int = 0  # connects whose SYN the kernel sent again (syn_retransmits)
    connect_s: list[float] = field(default_factory=list)  # every connect that succeeded
    total_s: list[float] = field(default_factory=list)    # every completed request
    duration_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def merge(self, other: LoadResult) -> None:
        """Add another process's clients (their figures run side by side)."""
        self.attempted += other.attempted
        self.completed += other.completed
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.connect_timeouts += other.connect_timeouts
        self.syn_retransmitted += other.syn_retransmitted
        self.connect_s += other.connect_s
        self.total_s += other.total_s
        self.duration_s = max(self.duration_s, other.duration_s)

    @staticmethod
    def percentile(values: list[float], q: float) -> float | None:
        """Nearest-rank percentile (``q`` in 0..1) of ``values``, None if empty."""
        if not values:
            return None
        s = sorted(values)
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    def summary(self) -> dict[str, object]:
        """JSON-ready figures: counts, errors, p50/p99/max of connect and total time in ms."""
        d: dict[str, object] = {
            "attempted": self.attempted,
            "completed": self.completed,
            "errors": dict(sorted(self.errors.items())),
            "connect_timeouts": self.connect_timeouts,
            "connected": len(self.connect_s),   # connect() returned: the handshake completed
            "syn_retransmitted": self.syn_retransmitted,
            "duration_s": round(self.duration_s, 3),
            "requests_per_s": round(self.completed / self.duration_s, 1)
            if self.duration_s > 0 else None,
        }
        for name, vals in (("connect", self.connect_s), ("total", self.total_s)):
            for label, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
                v = self.percentile(vals, q)
                d[f"{name}_{label}_ms"] = None if v is None else round(v * 1000, 2)
        # A connect of >= 1 s waited for at least one SYN retransmit; >= 3 s for two or more
        # (or, on a machine too busy to run the clients, for the CPU: syn_retransmitted).
        d["slow_connects_1s"] = sum(1 for v in self.connect_s if v >= 0.9)
        d["slow_connects_3s"] = sum(1 for v in self.connect_s if v >= 2.9)
        return d


def _kind(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return "reset"
    return "other"


@dataclass
class Started:
    """A connect() issued ahead (``_start_connects``): its socket, or why it failed."""
    t0: float
    sock: socket.socket | None = None
    error: OSError | None = None


AddrInfo = tuple[int, int, int, str, tuple]   # socket.getaddrinfo()'s, one address


def _address(host: str, port: int) -> AddrInfo:
    """Where the clients connect to (the first address the resolver gives)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]  # type: ignore[return-value]


def _start_connects(host: str, port: int, n: int, ai: AddrInfo | None = None) -> list[Started]:
    """``n`` non-blocking sockets, each with its connect() issued, one right after another
    (to ``ai``, resolved from ``host`` and ``port`` when not given)."""
    family, kind, proto, _, addr = ai if ai is not None else _address(host, port)
    out = []
    for _ in range(n):
        st = Started(time.monotonic())
        try:
            s = socket.socket(family, kind, proto)
        except OSError as exc:
            st.error = exc
        else:
            s.setblocking(False)
            err = s.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                st.sock = s
            else:
                s.close()
                st.error = OSError(err, os.strerror(err))
        out.append(st)
    return out


# struct tcp_info (include/uapi/linux/tcp.h, an ABI that only grows at its end):
# __u32 tcpi_total_retrans follows 8 bytes of __u8 fields and 23 __u32 fields.
TCPI_TOTAL_RETRANS = 8 + 23 * 4


def syn_retransmits(sock: socket.socket) -> int:
    """How many times the kernel sent ``sock``'s SYN again: its ``tcpi_total_retrans``
    read when the handshake is done, before any data (so every retransmit was a SYN)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_TOTAL_RETRANS + 4)
    if len(info) < TCPI_TOTAL_RETRANS + 4:
        raise OSError(errno.EPROTO, f"TCP_INFO of {len(info)} bytes has no tcpi_total_retrans")
    return int(struct.unpack_from("=I", info, TCPI_TOTAL_RETRANS)[0])


async def _finish_connect(sock: socket.socket) -> tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter, int]:
    """Streams on ``sock`` once its connect() (issued ahead) is done, and how many
    times its SYN was sent again (syn_retransmits)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(sock, writable)
    try:
        await done
    finally:
        loop.remove_writer(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))   # the errno's own subclass (refused, reset)
    retrans = syn_retransmits(sock)
    reader, writer = await asyncio.open_connection(sock=sock)
    return reader, writer, retrans


async def _one(request: bytes, connect_timeout_s: float, timeout_s: float, res: LoadResult,
               started: Started) -> None:
    """One request on the connection ``started`` (its connect() issued)."""
    res.attempted += 1
    t0 = started.t0
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            if started.sock is None:
                assert started.error is not None
                raise started.error
            # the connect timeout counts from the connect(), issued ahead or just now
            reader, w, retrans = await asyncio.wait_for(
                _finish_connect(started.sock),
                max(0.0, connect_timeout_s - (time.monotonic() - t0)))
        except asyncio.TimeoutError:
            res.connect_timeouts += 1
            raise
        writer = w
        res.connect_s.append(time.monotonic() - t0)
        res.syn_retransmitted += retrans > 0
        w.write(request)
        await asyncio.wait_for(w.drain(), timeout_s)
        data = await asyncio.wait_for(reader.read(), timeout_s)
        if data.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
            res.completed += 1
            res.total_s.append(time.monotonic() - t0)
        else:
            res.error("http")
    except (OSError, asyncio.TimeoutError) as exc:
        res.error(_kind(exc))
    finally:
        if writer is not None:
            writer.close()
        elif started.sock is not None:
            started.sock.close()


async def run_load_async(
    host: str,
    port: int,
    *,
    duration_s: float,
    concurrency: int,
    path: str = "/",
    connect_timeout_s: float = 10.0,
    timeout_s: float = 10.0,
    max_requests: int | None = None,
    pause_s: float = 0.0,
) -> LoadResult:
    """``concurrency`` clients, each one request at a time, each on a new connection,
    ``pause_s`` between one response and its next request."""
    res = LoadResult()
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Connection: close\r\n\r\n").encode()
    deadline = time.monotonic() + duration_s
    budget = MAX_REQUESTS_CAP if max_requests is None else min(max_requests, MAX_REQUESTS_CAP)

    def take() -> bool:
        nonlocal budget
        if budget <= 0 or time.monotonic() >= deadline:
            return False
        budget -= 1
        return True

    async def client(first: Started | None) -> None:
        if first is None:
            return
        await _one(request, connect_timeout_s, timeout_s, res, first)
        while take():
            if pause_s > 0:
                await asyncio.sleep(pause_s)
            await _one(request, connect_timeout_s, timeout_s, res,
                       _start_connects(host, port, 1, ai)[0])

    t0 = time.monotonic()
    n = max(1, concurrency)
    ai = _address(host, port)
    firsts = _start_connects(host, port, sum(take() for _ in range(n)), ai)
    await asyncio.gather(*(client(firsts[i] if i < len(firsts) else None) for i in range(n)))
    res.duration_s = time.monotonic() - t0
    return res


def run_load(
    host: str,
    port: int,
    *,
    duration_s: float,
    concurrency: int,
    path: str = "/",
    connect_timeout_s: float = 10.0,
    timeout_s: float = 10.0,
    max_requests: int | None = None,
    pause_s: float = 0.0,
) -> LoadResult:
    """Blocking wrapper of :func:`run_load_async` (runs its own event loop)."""
    return asyncio.run(run_load_async(
        host, port, duration_s=duration_s, concurrency=concurrency, path=path,
        connect_timeout_s=connect_timeout_s, timeout_s=timeout_s, max_requests=max_requests,
        pause_s=pause_s,
    ))


def run_load_processes(
    host: str,
    port: int,
    *,
    processes: int,
    duration_s: float,
    concurrency: int,
    path: str = "/",
    connect_timeout_s: float = 10.0,
    timeout_s: float = 10.0,
    max_requests: int | None = None,
    pause_s: float = 0.0,
) -> LoadResult:
    """:func:`run_load` in ``processes`` processes at once (``concurrency`` clients and
    ``max_requests`` split between them), merged: handshakes then happen on several CPUs
    at the same time, as they do with real clients (from one thread, loopback handshakes
    run one after another inside the sending CPU's softirq)."""
    if processes <= 1:
        return run_load(host, port, duration_s=duration_s, concurrency=concurrency, path=path,
                        connect_timeout_s=connect_timeout_s, timeout_s=timeout_s,
                        max_requests=max_requests, pause_s=pause_s)
    per = [concurrency // processes + (1 if i < concurrency % processes else 0)
           for i in range(processes)]
    caps = [None if max_requests is None else
            max_requests // processes + (1 if i < max_requests % processes else 0)
            for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as ex:
        futs = [ex.submit(run_load, host, port, duration_s=duration_s, concurrency=c,
                          path=path, connect_timeout_s=connect_timeout_s,
                          timeout_s=timeout_s, max_requests=m, pause_s=pause_s)
                for c, m in zip(per, caps) if c > 0]
        res = LoadResult()
        for f in futs:
            res.merge(f.result())
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m acceptrace.loadgen",
        description="HTTP load, one new connection per request; prints a JSON summary")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    ap.add_argument("--concurrency", type=int, default=64, help="clients (default 64)")
    ap.add_argument("--path", default="/")
    ap.add_argument("--max-requests", type=int)
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=10.0, help="response timeout")
    ap.add_argument("--processes", type=int, default=1,
                    help="split the clients over this many processes (default 1)")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="seconds each client waits between a response and its next request")
    ap.add_argument("--hold", action="store_true",
                    help="once started, print 'ready' on stderr and wait for a line on stdin "
                         "before the first request")
    a = ap.parse_args(argv)
    if a.hold:
        print("ready", file=sys.stderr, flush=True)
        sys.stdin.readline()
    res = run_load_processes(a.host, a.port, processes=a.processes, duration_s=a.duration,
                             concurrency=a.concurrency, path=a.path,
                             connect_timeout_s=a.connect_timeout, timeout_s=a.timeout,
                             max_requests=a.max_requests, pause_s=a.pause)
    print(json.dumps(res.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
