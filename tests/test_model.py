"""The run model: JSON round trip, nulls, atomic writes, schema checks; renderers."""

from __future__ import annotations

import json
import os

import pytest
from acceptrace.hist import Histogram
from acceptrace.model import SCHEMA, Interval, Listener, ProcessCount, Run, Sample
from acceptrace.render import render_interval_line, render_text
from acceptrace.words import fmt_us


def full_run() -> Run:
    run = Run.new(port=8000, backend="tracepoint")
    run.meta.kernel, run.meta.duration_s = "6.18.0", 12.5
    run.meta.started = "2026-11-25T10:00:00+00:00"
    run.meta.hooks = ["tracepoint:sock:sk_data_ready"]
    run.meta.notes = ["a note"]
    for name, vals in (("handshake", [12, 30]), ("accept_queue", [800, 840_000]),
                       ("syn_to_accept", [830, 840_100]), ("accept_to_read", [55.5])):
        for v in vals:
            run.stages[name].add(v)
    run.connections = {"syn": 2, "queued": 2, "accepted": 2, "read": 1}
    run.drops = {"listen_overflow": 312, "syn_dropped": 300, "ack_dropped": 12,
                 "synack_retransmits": 12, "syncookies": 0, "lost_events": 0}
    run.kernel_counters = {"TcpExtListenOverflows": 312, "TcpExtListenDrops": 312}
    depth = Histogram.empty("connections")
    for d in (1, 5, 129):
        depth.add(d)
    run.queues.backlog = 128
    run.queues.accept_queue_depth = depth
    run.queues.syn_queue_depth = Histogram.empty("connections")
    run.queues.listeners = [Listener("ipv6", "::", 8000, 128, 129)]
    run.processes = [ProcessCount(4242, "uvicorn", 2)]
    run.slowest = [Sample("ipv4", "10.0.0.7", 50123, "10.0.0.1", 8000, 4242, "uvicorn", False, 1,
                          30.0, 840_000.0, 840_100.0, None, 840_100.0)]
    run.intervals = [Interval(1.0, 1.0, 2, 2, 1, 312, 12, 129,
                              {"accept_queue": {"count": 2, "p50": 800, "p99": 840000}})]
    run.extra = {"accept_untracked": 0}
    return run


def test_round_trip_exact():
    d = full_run().to_json()
    text = json.dumps(d)
    assert Run.from_json(json.loads(text)).to_json() == d
    assert d["schema"] == SCHEMA
    assert d["slowest"][0]["accept_to_read_us"] is None
    assert d["stages"]["accept_queue"]["unit"] == "us"
    assert d["queues"]["accept_queue_depth"]["max"] == 129


def test_nulls_survive():
    run = full_run()
    run.drops["syn_dropped"] = None
    run.stages["handshake"] = None
    run.queues.backlog = None
    back = Run.from_json(json.loads(json.dumps(run.to_json())))
    assert back.drops["syn_dropped"] is None
    assert back.stages["handshake"] is None
    assert back.queues.backlog is None


def test_schema_and_shape_errors():
    d = full_run().to_json()
    with pytest.raises(ValueError, match="schema"):
        Run.from_json({**d, "schema": "acceptrace/v0"})
    with pytest.raises(ValueError, match="missing field"):
        Run.from_json({k: v for k, v in d.items() if k != "meta"})
    with pytest.raises(ValueError, match="integer or null"):
        Run.from_json({**d, "connections": {"accepted": "many"}})
    with pytest.raises(ValueError, match="not JSON"):
        Run.loads("{")
    with pytest.raises(ValueError, match="top level"):
        Run.from_json([1, 2])


def test_unknown_fields_are_tolerated():
    d = full_run().to_json()
    d["future_field"] = {"x": 1}
    d["meta"]["future"] = 1
    assert Run.from_json(d).meta.port == 8000


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    full_run().write_atomic(path)
    assert Run.read(path).to_json() == full_run().to_json()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text("old")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        full_run().write_atomic(path)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_render_text_contains_every_figure():
    text = render_text(full_run())
    for needle in ("port 8000", "tracepoint", "handshake", "accept_queue", "syn_to_accept",
                   "accept_to_read", "840 ms", "listen_overflow", "312", "ListenOverflows 312",
                   "FULL", "uvicorn", "4242", "10.0.0.7:50123", "1 SYN-ACK rtx", "a note",
                   "backlog (accept-queue limit)", "[::]:8000"):
        assert needle in text, needle


def test_render_nulls_as_na():
    run = full_run()
    run.drops["syn_dropped"] = None
    run.stages["handshake"] = None
    text = render_text(run)
    assert "n/a" in text
    # an unobservable stage is left out of the stage table, not shown as 0
    assert not any(ln.startswith("handshake ") for ln in text.splitlines())


def test_render_empty_run():
    text = render_text(Run.new(port=1, backend="tracepoint"))
    assert "accepted 0" in text and "no accept() on this port" in text


def test_interval_line():
    run = full_run()
    line = render_interval_line(run, run.intervals[0])
    assert line.startswith("10:00:01 +1.0s")
    for needle in ("accepted 2 (2/s)", "queued 2", "overflow 312", "synack_rtx 12",
                   "acceptq_max 129/128", "accept_queue p50 800µs p99 840ms"):
        assert needle in line, needle
    assert "\n" not in line


@pytest.mark.parametrize("us, text", [(None, "n/a"), (0, "0 µs"), (5.5, "5.5 µs"),
                                      (840, "840 µs"), (12_345, "12.3 ms"),
                                      (250_000, "250 ms"), (1_020_000, "1.02 s")])
def test_fmt_us(us, text):
    assert fmt_us(us) == text
