"""The lab's pure parts (no root): the scenarios' table, the verdicts, the exit code,
the spoofed SYN, what a killed lab left behind.  tests/test_lab.py runs it for real."""

from __future__ import annotations

import copy
import socket
import struct
from pathlib import Path

import pytest
from acceptrace import lab, procnet
from acceptrace.diagnose import diagnose
from acceptrace.errors import UserError
from acceptrace.lab import SCENARIOS, PhaseResult, ScenarioResult
from acceptrace.model import Run
from acceptrace.render import to_text
from rich.console import Console

FIXTURE = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"


def test_every_scenario_is_listed_with_symptom_cause_fix():
    text = to_text(lab.render_list(), 200)
    assert set(SCENARIOS) == {"accept-overflow", "syn-flood", "somaxconn-clamp",
                              "event-loop-busy", "abort-on-overflow", "workers"}
    for sc in SCENARIOS.values():
        assert sc.name in text
        assert sc.symptom and sc.cause and sc.fix and sc.expect
        # each phase is its own namespace's: a server, a load, what differs
        assert sc.before.what != sc.fixed.what


def test_scenario_names():
    assert lab.scenario_names("all") == list(SCENARIOS)
    assert lab.scenario_names("syn-flood") == ["syn-flood"]
    with pytest.raises(UserError, match="no lab scenario 'nope': one of accept-overflow"):
        lab.scenario_names("nope")


def test_server_and_load_command_lines():
    assert lab.Server(backlog=8).argv(8000)[2:4] == ["uvicorn", "acceptrace.demo_app:app"]
    assert "--backlog" in lab.Server(backlog=8).argv(8000)
    g = lab.Server(workers=4, gunicorn=True, reuse_port=True).argv(8000)
    assert g[2] == "gunicorn" and "--reuse-port" in g and g[g.index("--workers") + 1] == "4"
    load = lab.Load("/slow?ms=20", concurrency=32, processes=2, max_requests=9)
    argv = load.argv(8000)
    assert argv[argv.index("--processes") + 1] == "2" and "--max-requests" in argv
    assert load.describe() == "32 clients from 2 processes, GET /slow?ms=20, 9 requests"
    assert load.longest_s == load.duration_s + load.connect_timeout_s + load.timeout_s


def test_syn_packet_is_a_valid_syn():
    pkt = lab.syn_packet("198.18.0.99", "198.18.0.1", 40000, 8000)
    ip, tcp = pkt[:20], pkt[20:]
    assert ip[0] == 0x45 and ip[9] == socket.IPPROTO_TCP
    assert socket.inet_ntoa(ip[12:16]) == "198.18.0.99"
    sport, dport, _seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
    assert (sport, dport, ack, off >> 4, flags) == (40000, 8000, 0, 6, 0x02)
    # the TCP checksum over the pseudo-header comes out as 0 when checked
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    assert lab._checksum(pseudo + tcp) == 0


def phase(label: str, run: Run, client: dict | None = None) -> PhaseResult:
    c = {"attempted": 10, "completed": 10, "errors": {}, "connect_timeouts": 0,
         "connected": 10, "slow_connects_1s": 0, "syn_retransmitted": 0,
         "connect_p50_ms": 1.0, "connect_p99_ms": 2.0,
         "connect_max_ms": 3.0, "total_p50_ms": 5.0, "total_p99_ms": 9.0,
         **(client or {})}
    sc = SCENARIOS["accept-overflow"]
    return PhaseResult(label=label, phase=sc.before if label == "before" else sc.fixed,
                       namespace=f"atlab-x-{label}-1", run=run, client=c,
                       netstat=dict.fromkeys(lab.NETSTAT_KEYS, 0), sysctls={},
                       findings=diagnose(run))


def results(tmp_path: Path) -> tuple[ScenarioResult, ScenarioResult]:
    over = Run.read(FIXTURE)            # overflowed: accept_queue_overflow is named
    calm = copy.deepcopy(over)
    calm.drops = dict.fromkeys(calm.drops, 0)
    sc = SCENARIOS["accept-overflow"]
    waited = {"slow_connects_1s": 7, "syn_retransmitted": 7}
    good = ScenarioResult(sc, phase("before", over, waited),
                          phase("fixed", calm), tmp_path / "good")
    bad = ScenarioResult(SCENARIOS["syn-flood"], phase("before", over), phase("fixed", calm),
                         tmp_path / "bad")
    return good, bad


def test_event_loop_busy_says_the_threshold_it_used(tmp_path):
    """The symptom's words carry the stretched threshold the check itself used."""
    run = Run.read(FIXTURE)
    sc = SCENARIOS["event-loop-busy"]
    words = []
    for stretch, p99 in ((1.0, 30.0), (3.0, 60.0)):
        before = phase("before", run, {"total_p99_ms": p99})
        before.stretch = stretch
        res = ScenarioResult(sc, before, phase("fixed", run), tmp_path / str(stretch))
        words.append((res.seen, res.seen_words))
    assert words == [(True, "/health p99 ≥ 25 ms"), (False, "/health p99 ≥ 75 ms")]


def test_verdicts(tmp_path):
    good, bad = results(tmp_path)
    assert good.ok and good.named == ["accept_queue_overflow"] and good.seen
    assert not bad.ok and bad.named == []      # a flood's cause was not named
    text = to_text(lab.render_result(good), 160)
    assert "the expected cause was named [accept_queue_overflow]" in text
    assert "requests ok / sent" in text and "ListenOverflows" in text
    table = to_text(lab.render_all([good, bad], {"workers": "the server did not start"}), 200)
    rows = {ln.split("│")[1].strip(): ln for ln in table.splitlines() if ln.count("│") > 3}
    assert "yes" in rows["accept-overflow"].split("│")[-2]
    assert "NO" in rows["syn-flood"] and "NO" in rows["workers"]
    assert "did not run: the server did not start" in table


def test_exit_code_says_whether_every_cause_was_named(tmp_path, monkeypatch):
    good, bad = results(tmp_path)
    monkeypatch.setattr(lab, "check_tools", lambda: None)
    monkeypatch.setattr(lab, "remove_stale_namespaces", lambda: [])
    con = Console(file=open("/dev/null", "w"), width=120)  # noqa: SIM115
    monkeypatch.setattr(lab, "run_scenario", lambda sc, *a, **k: good)
    assert lab.run_lab("accept-overflow", tmp_path, "auto", con, con) == 0
    monkeypatch.setattr(lab, "run_scenario", lambda sc, *a, **k: bad)
    assert lab.run_lab("syn-flood", tmp_path, "auto", con, con) == 1

    def fails(sc: lab.Scenario, *a: object, **k: object) -> ScenarioResult:
        if sc.name == "workers":
            raise UserError("the lab's server exited (1)")
        return good

    monkeypatch.setattr(lab, "run_scenario", fails)
    assert lab.run_lab("all", tmp_path, "auto", con, con) == 1   # one did not run
    with pytest.raises(UserError):                                # alone: its own error
        lab.run_lab("workers", tmp_path, "auto", con, con)
    (tmp_path / "file").touch()
    with pytest.raises(UserError, match="cannot write there"):    # a bad --out: one line
        lab.run_lab("workers", tmp_path / "file", "auto", con, con)


def test_stale_namespaces_of_a_killed_lab_are_removed(tmp_path, monkeypatch):
    import os

    killed: list[str] = []
    monkeypatch.setattr(lab, "_kill_namespace", killed.append)
    for name in ("atlab-syn-flood-before-999999999", f"atlab-workers-fixed-{os.getpid()}",
                 "at-test-12345678", "atlab-odd"):
        (tmp_path / name).touch()
    assert lab.remove_stale_namespaces(tmp_path) == ["atlab-syn-flood-before-999999999"]
    assert killed == ["atlab-syn-flood-before-999999999"]   # a live lab's is left alone


def test_signals_are_raised_after_teardown(monkeypatch):
    import signal

    with pytest.raises(lab.LabInterrupted), lab.interruptible() as state:
        with lab.shielded():
            state(signal.SIGTERM, None)           # arrives during teardown: kept
            assert state.pending
        # ... and raised as soon as teardown ends
        pytest.fail("not raised")
    assert state.signum == signal.SIGTERM
    with pytest.raises(lab.LabInterrupted), lab.interruptible() as state:
        state(signal.SIGINT, None)
    with lab.interruptible() as state, pytest.raises(lab.LabInterrupted) as exc:
        with lab.shielded():
            state(signal.SIGHUP, None)
            state(signal.SIGTERM, None)           # a second one is ignored
    assert exc.value.signum == signal.SIGHUP


def test_group_wakeups_sums_the_groups_threads(tmp_path):
    def proc(pid: int, pgrp: int, *switches: int) -> None:
        d = tmp_path / str(pid)
        (d / "task").mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (py thon) S 1 {pgrp} {pgrp} 0 -1\n")
        for i, n in enumerate(switches):
            t = d / "task" / str(pid + i)
            t.mkdir()
            t.joinpath("status").write_text(f"Name:\tx\nvoluntary_ctxt_switches:\t{n}\n"
                                            "nonvoluntary_ctxt_switches:\t99\n")
    proc(10, 10, 5, 7)
    proc(11, 10, 3)
    proc(12, 12, 1000)
    assert lab.group_wakeups(10, tmp_path) == 15


def test_a_sized_load_fits_the_servers_speed():
    light = SCENARIOS["workers"].before.load
    assert light.sized >= 4 * 50      # enough accepts for workers_uneven to judge 4 workers
    # a fast server: the load as written (5 ms apart, 4 s)
    assert lab.size_load(light, 0.0015) == lab.replace(light, pause_s=0.005, duration_s=4.0)
    # an emulated one, 60 ms a request: 120 ms apart, long enough for the connections
    slow = lab.size_load(light, 0.060)
    assert slow.pause_s == pytest.approx(0.120)
    assert slow.duration_s == pytest.approx(light.sized * 0.180, abs=0.1)
    # bounded, and a load that is not sized is left alone
    assert lab.size_load(light, 5.0).duration_s == lab.SIZED_MAX_S
    assert lab.size_load(lab.BURST, 5.0) is lab.BURST


def test_a_slow_machine_stretches_the_handlers_not_the_kernels_timers():
    # this host (1.2-1.4 ms), even a busy one, is not stretched; an emulated CPU is
    assert lab.stretch_factor(0.0013) == 1.0
    assert lab.stretch_factor(0.0055) == 1.0          # < SLOW_MACHINE times the reference
    assert lab.stretch_factor(0.0179) == pytest.approx(0.0179 / lab.REFERENCE_REQUEST_S, 0.01)
    assert lab.stretch_factor(5.0) == lab.MAX_STRETCH
    blocking = lab.BLOCKING
    assert lab.stretch_load(blocking, 1.0) is blocking
    slow = lab.stretch_load(blocking, 12.0)
    assert slow.path == "/slow?ms=240"
    assert (slow.duration_s, slow.connect_timeout_s, slow.concurrency) == (
        blocking.duration_s, blocking.connect_timeout_s, blocking.concurrency)
    assert slow.timeout_s == blocking.timeout_s * lab.MAX_TIMEOUT_STRETCH
    assert lab.stretch_path("/cpu?ms=50&x=1", 3.0) == "/cpu?ms=150&x=1"
    assert lab.stretch_path("/health", 3.0) == "/health"
    light = SCENARIOS["workers"].before.load
    assert lab.stretch_load(light, 12.0) is light      # sized to the server already


def test_wakeups_per_connection_are_the_loads_own():
    run = Run.new(port=8000, backend="fentry")
    res = PhaseResult("before", SCENARIOS["workers"].before, "ns", run, client={},
                      netstat={"TcpPassiveOpens": 200}, sysctls={}, wakeups=900,
                      idle_wakeups_per_s=12.0)
    assert res.wakeups_per_connection == 4.5
    assert SCENARIOS["workers"].seen(res)
    res.wakeups = 300
    assert not SCENARIOS["workers"].seen(res)
    res.netstat = {}
    assert res.wakeups_per_connection is None


def test_bad_input_is_one_line(tmp_path):
    from helpers import run_cli

    for args, want in ((["lab", "run", "nope"], "no lab scenario 'nope'"),
                       (["lab", "run"], "Missing argument"),
                       (["lab", "run", "all", "--backend", "ebpf"], "Invalid value")):
        res = run_cli(*args)
        assert res.returncode == 2, (args, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and want in lines[0], (args, res.stderr)
    res = run_cli("lab", "list")
    assert res.returncode == 0 and "abort-on-overflow" in res.stdout


class Inside:
    """A namespace whose listener's accept queue reads ``depths`` one after another
    (the last one for ever), its counters still."""

    def __init__(self, depths: list[int]) -> None:
        self.depths = depths

    def read_together(self, port: int) -> tuple[dict, dict[str, int]]:
        depth = self.depths.pop(0) if len(self.depths) > 1 else self.depths[0]
        st = procnet.ListenerStats("inet", "127.0.0.1", port, 1, 0, depth, 64)
        return {1: st}, dict.fromkeys(lab.SETTLE_KEYS, 7)


class FakeNs:
    def __init__(self, depths: list[int]) -> None:
        self.inside = Inside(depths)


def test_settle_waits_for_the_accept_queue_to_empty_and_says_what_it_left():
    # drained after three reads, then quiet: nothing left
    assert lab.settle(FakeNs([3, 2, 1, 0]), 8000, timeout=5, quiet_s=0.2) == 0  # type: ignore[arg-type]
    # never drained within the timeout: how many it left queued
    assert lab.settle(FakeNs([5, 4]), 8000, timeout=0.5, quiet_s=0.2) == 4  # type: ignore[arg-type]
