"""The listener table (tracer/listeners.py) and the key names of the dashboard,
on hand-made runs: no kernel, no root."""

from __future__ import annotations

from acceptrace import listeners
from acceptrace.model import Listener, Meta, Run
from acceptrace.runner import key_names


def sec(port: int, overflow: int | None, accepted: int, ns: str = "acceptrace's own") -> Run:
    r = Run.new(port=port, backend="tracepoint")
    r.meta = Meta(port=port, backend="tracepoint", duration_s=10.0,
                  netns={"inode": 1, "name": ns, "pid": None})
    r.drops["listen_overflow"] = overflow
    r.connections["accepted"] = accepted
    r.queues.listeners = [Listener("ipv4", "127.0.0.1", port, 128, 3, 1, 0)]
    return r


def test_overflowing_listener_ranks_first_then_the_busiest():
    run = Run.new(port=0, backend="tracepoint")
    run.targets = [sec(1, 0, 1000), sec(2, 30, 10), sec(3, 0, 5)]
    rows = listeners.table(run)
    assert [r.section.meta.port for r in rows] == [2, 1, 3]
    assert rows[0].overflows_s == 3.0 and rows[1].conn_s == 100.0
    assert rows[0].namespace == "host" and rows[0].address == "127.0.0.1:2"


def test_unknown_overflow_is_not_zero():
    run = Run.new(port=0, backend="tracepoint")
    run.targets = [sec(1, None, 10, ns="ip netns blue")]
    (row,) = listeners.table(run)
    assert row.overflows_s is None and row.namespace == "ip netns blue"


def test_sections_round_trip_through_json():
    run = Run.new(port=0, backend="tracepoint")
    run.targets = [sec(1, 0, 10), sec(2, 5, 3)]
    back = Run.loads(run.dumps())
    assert [t.meta.port for t in back.targets] == [1, 2]
    assert back.targets[1].drops["listen_overflow"] == 5
    assert back.targets[0].queues.listeners[0].port == 1


def test_cursor_keys_and_a_lone_escape():
    assert key_names("\x1b[A\x1b[Bj\r") == ["up", "down", "j", "enter"]
    assert key_names("\x1b") == ["esc"]
    assert key_names("\x1b[1;5C" + "q") == ["q"]  # an unknown sequence is skipped whole
