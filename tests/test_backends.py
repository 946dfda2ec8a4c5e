"""Backends for real: which ones load on this kernel, and that each leaves nothing behind.

Runs on the host (tracepoint) and in every QEMU guest cell (tests/vm/run.py),
where ACCEPTRACE_TEST_BACKEND picks fentry, kprobe or tracepoint.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import requested_backend
from helpers import listener, ours_attached, run_cli

pytestmark = pytest.mark.root


def fentry_loads_here() -> bool:
    """An independent answer (not acceptrace's): can BCC load any fentry program?"""
    import bcc  # the test's own probe, outside the package

    try:
        b = bcc.BPF(text=b"KFUNC_PROBE(tcp_conn_request) { return 0; }")
    except Exception:  # noqa: BLE001 - any refusal means no
        return False
    b.cleanup()
    return True


HOOK_PREFIX = {"fentry": ("fentry:", "fexit:"), "kprobe": ("kprobe:", "kretprobe:"),
               "tracepoint": ("raw_tracepoint:sk_data_ready",)}


def test_backend_choice_matches_what_the_kernel_allows(tmp_path):
    """Each --backend either runs and says so in meta, or fails in one clear line;
    which ones run is checked against the kernel's own facts; auto takes the first."""
    if requested_backend() not in ("auto", "fentry"):
        pytest.skip("checked once per kernel: in the host run and the guests' fentry pass")
    tracefs = Path("/sys/kernel/tracing")
    if not (tracefs / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)], check=False)
    works = {
        "fentry": fentry_loads_here(),
        "kprobe": (tracefs / "kprobe_events").exists(),
        "tracepoint": (tracefs / "events/sock/sk_data_ready").is_dir(),
    }
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = str(srv.getsockname()[1])
    try:
        for name in ("fentry", "kprobe", "tracepoint", "auto"):
            out = tmp_path / f"{name}.json"
            res = run_cli("--port", port, "--backend", name, "--duration", "0.3", "--no-dispatch",
                          "--json", str(out))
            assert "Traceback" not in res.stderr, res.stderr
            if name == "auto":
                expected = next((b for b in ("fentry", "kprobe", "tracepoint") if works[b]), None)
                assert expected is not None and res.returncode == 0, res.stderr
                meta = json.loads(out.read_text())["meta"]
                assert meta["backend"] == expected
                refused = [b for b in ("fentry", "kprobe", "tracepoint")[
                    :("fentry", "kprobe", "tracepoint").index(expected)]]
                for b in refused:   # every refusal is said, and kept in the report
                    assert f"{b} backend unavailable" in res.stderr
                    assert any(n.startswith(f"backend auto: {b}:") for n in meta["notes"])
                continue
            if works[name]:
                assert res.returncode == 0, res.stderr
                meta = json.loads(out.read_text())["meta"]
                assert meta["backend"] == name
                assert any(h.startswith(HOOK_PREFIX[name]) for h in meta["hooks"]), meta["hooks"]
                assert "raw_tracepoint:tcp_retransmit_synack" in meta["hooks"]
            else:
                assert res.returncode != 0
                errors = [ln for ln in res.stderr.splitlines() if "cannot run here" in ln]
                assert len(errors) == 1 and errors[0].startswith(
                    f"acceptrace: the {name} backend cannot run here: "), res.stderr
                assert not out.exists()
    finally:
        srv.close()


def test_backend_detaches_and_reports_its_hooks(tracer):
    """The backend asked for attaches what meta.hooks says, and nothing of it is
    left loaded after SIGTERM (bpftool lists every BPF program of the machine)."""
    srv = listener(8)
    port = srv.getsockname()[1]
    assert ours_attached() == 0
    t = tracer(port).start()
    try:
        loaded = ours_attached()
        c = socket.create_connection(("127.0.0.1", port))
        srv.accept()[0].close()
        c.close()
        time.sleep(0.3)
    finally:
        rc = t.stop(signal.SIGTERM)
        srv.close()
    assert rc == 0, t.stderr
    run = t.report()
    want = requested_backend()
    if want != "auto":
        assert run["meta"]["backend"] == want
    hooks = run["meta"]["hooks"]
    assert loaded >= len({h for h in hooks if not h.startswith("uprobe:")}) // 2 > 0, hooks
    assert run["connections"]["accepted"] == 1
    assert ours_attached() == 0, "BPF programs still loaded after exit"
    # kretprobes with maxactive go through kprobe_events, named ..._bcc_<pid>
    events = Path("/sys/kernel/tracing/kprobe_events")
    if events.exists():
        assert f"bcc_{t.proc.pid}" not in events.read_text()
