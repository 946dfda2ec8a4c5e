"""The built-in demo target: a FastAPI app with the classic bug of blocking
code in an ``async def`` handler, which stalls uvicorn's event loop so that it
cannot call accept() fast enough and a small accept queue overflows.

``ACCEPTRACE_DEMO_BLOCK_MS`` (default 20) is how long ``GET /`` blocks the loop.
The lab (tracer/lab.py) also uses the other routes: ``/slow`` blocks the loop
(``time.sleep``), ``/async`` waits without blocking it (``asyncio.sleep``: the
fix of the blocking call), ``/cpu`` burns CPU on the loop (a CPU-bound handler)
and ``/cpu-offload`` does the same work in a process pool, off the loop: the pool
(``ACCEPTRACE_DEMO_POOL`` processes, default: one per CPU) is started and warmed at
startup when ``ACCEPTRACE_DEMO_POOL`` is set, so that no request waits for it.
Its processes run at nice POOL_NICE: where there are fewer CPUs than busy processes
(one, or an emulated VM's), the event loop still runs first when it has work, as the
fix means it to.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

BLOCK_MS = float(os.environ.get("ACCEPTRACE_DEMO_BLOCK_MS", "20"))
MAX_MS = 10_000.0
POOL_NICE = 10       # the pool's processes yield the CPU to the event loop

_pool: ProcessPoolExecutor | None = None


def _pool_size() -> int:
    return int(os.environ.get("ACCEPTRACE_DEMO_POOL") or 0) or (os.cpu_count() or 1)


def _start_pool() -> ProcessPoolExecutor:
    """Processes started from a fresh interpreter (forkserver), not forked from the
    running event loop: a fork of a loop in the middle of requests can hang."""
    return ProcessPoolExecutor(max_workers=_pool_size(),
                               mp_context=multiprocessing.get_context("forkserver"),
                               initializer=os.nice, initargs=(POOL_NICE,))


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    global _pool
    if os.environ.get("ACCEPTRACE_DEMO_POOL"):
        _pool = _start_pool()
        loop = asyncio.get_running_loop()
        # every process started and the module imported before the first request
        await asyncio.gather(*(loop.run_in_executor(_pool, burn, 1.0)
                               for _ in range(_pool_size() * 2)))
    try:
        yield
    finally:
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)


app = FastAPI(title="acceptrace demo target", lifespan=lifespan)


def _clamp(ms: float) -> float:
    return max(0.0, min(ms, MAX_MS))


def burn(ms: float) -> int:
    """Keep a CPU busy for ``ms`` of wall time (what a CPU-bound handler does)."""
    end = time.perf_counter() + _clamp(ms) / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


@app.get("/")
async def index() -> dict[str, object]:
    if BLOCK_MS > 0:
        time.sleep(BLOCK_MS / 1000)  # the bug: a blocking call inside async def
    return {"ok": True, "blocked_ms": BLOCK_MS}


@app.get("/slow")
async def slow(ms: float = 100.0) -> dict[str, object]:
    time.sleep(_clamp(ms) / 1000)
    return {"ok": True, "blocked_ms": ms}


@app.get("/async")
async def async_wait(ms: float = 100.0) -> dict[str, object]:
    await asyncio.sleep(_clamp(ms) / 1000)  # the same wait, the event loop free meanwhile
    return {"ok": True, "waited_ms": ms}


@app.get("/cpu")
async def cpu(ms: float = 10.0) -> dict[str, object]:
    return {"ok": True, "spins": burn(ms)}  # CPU-bound work on the event loop


@app.get("/cpu-offload")
async def cpu_offload(ms: float = 10.0) -> dict[str, object]:
    global _pool
    if _pool is None:
        _pool = _start_pool()
    spins = await asyncio.get_running_loop().run_in_executor(_pool, burn, ms)
    return {"ok": True, "spins": spins}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
