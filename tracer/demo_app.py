"""The built-in demo target: a FastAPI app with the classic bug of blocking
code in an ``async def`` handler, which stalls uvicorn's event loop so that it
cannot call accept() fast enough and a small accept queue overflows.

``ACCEPTRACE_DEMO_BLOCK_MS`` (default 20) is how long ``GET /`` blocks the loop.
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

BLOCK_MS = float(os.environ.get("ACCEPTRACE_DEMO_BLOCK_MS", "20"))

app = FastAPI(title="acceptrace demo target")


@app.get("/")
async def index() -> dict[str, object]:
    if BLOCK_MS > 0:
        time.sleep(BLOCK_MS / 1000)  # the bug: a blocking call inside async def
    return {"ok": True, "blocked_ms": BLOCK_MS}


@app.get("/slow")
async def slow(ms: float = 100.0) -> dict[str, object]:
    time.sleep(max(0.0, min(ms, 10_000.0)) / 1000)
    return {"ok": True, "blocked_ms": ms}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
