"""The bundled load generator: one new TCP connection per HTTP request.

Bounded in time and count, loopback only in the demo and tests. Connect
times show the cost of dropped SYNs: a client whose SYN was dropped waits
for its retransmit (1 s, then 3 s, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class LoadResult:
    attempted: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    connect_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @staticmethod
    def _pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        s = sorted(values)
        return s[min(len(s) - 1, int(q * len(s)))]

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        del d["connect_s"], d["total_s"]
        for name, vals in (("connect", self.connect_s), ("total", self.total_s)):
            for label, q in (("p50", 0.5), ("p99", 0.99)):
                v = self._pct(vals, q)
                d[f"{name}_{label}_ms"] = None if v is None else round(v * 1000, 2)
            d[f"{name}_max_ms"] = round(max(vals) * 1000, 2) if vals else None
        d["slow_connects_1s"] = sum(1 for v in self.connect_s if v >= 0.9)
        return d


async def _one(host: str, port: int, path: str, timeout: float, res: LoadResult) -> None:
    res.attempted += 1
    t0 = time.monotonic()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        t1 = time.monotonic()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
        if data.startswith(b"HTTP/1.1 2") or data.startswith(b"HTTP/1.0 2"):
            res.completed += 1
            res.connect_s.append(t1 - t0)
            res.total_s.append(time.monotonic() - t0)
        else:
            res.error("http")
    except asyncio.TimeoutError:
        res.error("timeout")
    except ConnectionRefusedError:
        res.error("refused")
    except ConnectionResetError:
        res.error("reset")
    except OSError:
        res.error("other")
    finally:
        if writer is not None:
            writer.close()


async def run_load_async(
    host: str,
    port: int,
    *,
    duration_s: float,
    concurrency: int,
    path: str = "/",
    timeout_s: float = 10.0,
    max_requests: int | None = None,
) -> LoadResult:
    res = LoadResult()
    deadline = time.monotonic() + duration_s
    budget = [max_requests]

    def take() -> bool:
        if time.monotonic() >= deadline:
            return False
        if budget[0] is not None:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
        return True

    async def worker() -> None:
        while take():
            await _one(host, port, path, timeout_s, res)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    res.duration_s = time.monotonic() - t0
    return res


def run_load(host: str, port: int, **kw: object) -> LoadResult:
    """Blocking wrapper of :func:`run_load_async`."""
    return asyncio.run(run_load_async(host, port, **kw))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one new connection per HTTP request")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--path", default="/")
    ap.add_argument("--max-requests", type=int)
    a = ap.parse_args(argv)
    res = run_load(a.host, a.port, duration_s=a.duration, concurrency=a.concurrency,
                   path=a.path, max_requests=a.max_requests)
    print(json.dumps(res.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
