"""Shared fixtures: running the real acceptrace CLI against real sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

IS_ROOT = os.geteuid() == 0

# How much slower than a quiet host this machine runs the tests: 1 on a host; in a
# QEMU guest, its calibration at boot (tests/vm/calibrate.py). Every harness
# timeout below is scaled by it, so a busy or slow day waits longer instead of
# failing a test that would have passed. It bounds waits only; no test asserts
# on a duration.
TIME_SCALE = max(1.0, float(os.environ.get("ACCEPTRACE_TEST_TIME_SCALE") or 1))


def scaled(seconds: float) -> float:
    """A harness timeout written for a quiet host, for this machine."""
    return seconds * TIME_SCALE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Root tests attach real BPF programs. Without root they cannot run at all;
    # as root (CI) they always run, and a missing BCC/BTF is a failure, not a skip.
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: attaches BPF programs (sudo make test)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


FIXTURE_61 = Path(__file__).parent / "fixtures" / "btf-debian-6.1-amd64.xz"


@pytest.fixture(scope="session")
def btf_61():
    """The BTF of Debian's 6.1.192 kernel (a fixture file), for pure unit tests."""
    import lzma

    from acceptrace.btf import BTF

    return BTF.from_bytes(lzma.decompress(FIXTURE_61.read_bytes()))


NETSTAT_FILES = ("/proc/net/netstat", "/proc/net/snmp")


def read_netstat() -> dict[str, int]:
    """The kernel's counters, parsed independently of acceptrace's own parser."""
    out: dict[str, int] = {}
    for path in NETSTAT_FILES:
        lines = Path(path).read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            prefix, _, keys = names.partition(":")
            for k, v in zip(keys.split(), values.partition(":")[2].split()):
                out[prefix + k] = int(v)
    return out


# The QEMU guest suite (tests/test_vm.py) runs the root tests once per backend.
BACKEND_ENV = "ACCEPTRACE_TEST_BACKEND"


def requested_backend() -> str:
    """The backend the root tests ask for: auto unless the guest runner says otherwise."""
    return os.environ.get(BACKEND_ENV, "auto")


def backend_args() -> list[str]:
    return ["--backend", requested_backend()]


def exact_drops_expected(report: dict) -> bool:
    """Does this run count drops at the kernel's decision points (fentry, kprobe)?"""
    return report["meta"]["backend"] in ("fentry", "kprobe")


def split_unobservable(run: dict) -> bool:
    """The tracepoint backend before Linux 6.15 cannot tell final-ACK drops from SYN
    drops (no TCP_LISTEN_OVERFLOW drop reason): listen_overflow and the split are
    null, and the run must say why."""
    if run["drops"]["listen_overflow"] is not None:
        return False
    assert run["meta"]["backend"] == "tracepoint", run["drops"]
    assert any("TCP_LISTEN_OVERFLOW" in n for n in run["meta"]["notes"]), run["meta"]["notes"]
    assert run["drops"]["syn_dropped"] is None and run["drops"]["ack_dropped"] is None
    return True


def kprobe_fed(run: dict, key: str) -> bool:
    """Is this drop counter fed by kprobes in this run?  (The fentry backend falls back
    to kretprobes for tcp_v{4,6}_syn_recv_sock, i.e. the final-ACK drops, on old x86.)"""
    if run["meta"]["backend"] == "kprobe":
        return True
    return key.startswith("ack") and "kretprobe:tcp_v4_syn_recv_sock" in run["meta"]["hooks"]


def unseen_packets(run: dict, *keys: str) -> int:
    """How far below the kernel's delta these counters may be.  Kprobe programs are
    skipped in a softirq that began inside another kprobe, uprobe or tracepoint
    program on its CPU; extra.packets_unseen counts the port's packets received in
    such softirqs, so each missed SYN or ACK (and its drop) is one of them."""
    if not any(kprobe_fed(run, k) for k in keys):
        return 0
    unseen = run["extra"]["packets_unseen"]
    assert unseen is not None, ("kprobe-fed drops without packets_unseen", run["meta"]["notes"])
    return unseen


def skipped_runs(run: dict, *figures: str) -> int:
    """How many runs the kernel skipped of the programs that feed these figures: the
    cost section's exact count where this kernel keeps one (recursion_misses), else --
    kprobes before 6.7 -- extra.packets_unseen (each missed SYN, final ACK or queue
    insert arrived in one of those packets), else 0."""
    cost = run.get("cost") or {}
    progs = [p for p in cost.get("programs", []) if set(p["feeds"]) & set(figures)]
    if progs and all(p["missed"] is not None for p in progs):
        return sum(p["missed"] for p in progs)
    return run["extra"].get("packets_unseen") or 0


def assert_count(run: dict, key: str, n: int) -> None:
    """connections[key] == n, but for the runs the kernel skipped (and said so)."""
    ours = run["connections"][key]
    slack = skipped_runs(run, key)
    assert n - slack <= ours <= n, (key, ours, n, slack, run.get("cost"), run["extra"])


def assert_counted(run: dict, ours: int, kernel: int, *keys: str) -> None:
    """ours == the kernel's delta, but for what the hooks could not see."""
    slack = unseen_packets(run, *keys)
    assert kernel - slack <= ours <= kernel, (keys, ours, kernel, run["drops"], run["extra"])


def assert_listen_overflow(run: dict, expected: int) -> None:
    """drops.listen_overflow == expected (the kernel's delta), or -- where the backend
    cannot split it -- null with a note, and the kernel's own counter in the report."""
    if split_unobservable(run):
        assert run["kernel_counters"]["TcpExtListenOverflows"] == expected
    else:
        assert_counted(run, run["drops"]["listen_overflow"], expected,
                       "syn_dropped_acceptq_full", "ack_dropped_acceptq_full")


# Stages that start at the SYN: a connection counts there only if its SYN time is known.
SYN_STAGES = frozenset({"handshake", "syn_to_accept", "syn_to_dispatch", "syn_to_response"})


def assert_stage_counts(run: dict, n: int, stages: tuple[str, ...]) -> None:
    """Each stage counted all n connections -- but for the SYN-based stages on the
    tracepoint backend, which finds a child at the accept-queue tail when the
    listener's sk_data_ready fires: two children queued at once on two CPUs show
    the same tail, and the other one is known only from its state change, without
    a SYN time.  extra.queue_missed counts exactly those (docs/schema.md); the
    function backends see every child, so none may be missed there."""
    missed = run["extra"]["queue_missed"]
    if run["meta"]["backend"] != "tracepoint":
        assert missed == 0, missed
    assert missed <= n // 10, missed
    for stage in stages:
        want = n - missed if stage in SYN_STAGES else n
        assert run["stages"][stage]["count"] == want, (stage, run["stages"][stage]["count"],
                                                      want, missed)


EXACT_DROP_KEYS = ("syn_dropped_acceptq_full", "syn_dropped_synq_full", "ack_dropped_acceptq_full",
                   "listen_drops_other")


def check_drop_attribution(run: dict, before: dict[str, int], after: dict[str, int]) -> None:
    """fentry/kprobe: each decision-point counter equals its kernel counter's delta,
    and together they are every listen drop.  tracepoint: what it cannot split is null."""
    d = run["drops"]

    def delta(name: str) -> int:
        return after[name] - before[name]

    if not exact_drops_expected(run):
        for key in ("syn_dropped_acceptq_full", "syn_dropped_synq_full", "syncookies_sent",
                    "listen_drops_other"):
            assert d[key] is None, (key, d)
        return
    assert_counted(run, d["syn_dropped_acceptq_full"] + d["ack_dropped_acceptq_full"],
                   delta("TcpExtListenOverflows"),
                   "syn_dropped_acceptq_full", "ack_dropped_acceptq_full")
    assert_counted(run, d["syn_dropped_synq_full"], delta("TcpExtTCPReqQFullDrop"),
                   "syn_dropped_synq_full")
    assert_counted(run, d["syncookies_sent"], delta("TcpExtSyncookiesSent"), "syncookies_sent")
    assert_counted(run, sum(d[k] for k in EXACT_DROP_KEYS), delta("TcpExtListenDrops"),
                   *EXACT_DROP_KEYS)
    assert d["syn_dropped"] == d["syn_dropped_acceptq_full"]
    assert d["ack_dropped"] == d["ack_dropped_acceptq_full"]


# Where every acceptrace start of the run says how long it took (its "started in"
# line), one line per start: the QEMU guests set it, and their summary shows the
# spread of a start on that kernel and backend (tests/vm/run.py).
START_LOG_ENV = "ACCEPTRACE_TEST_START_LOG"


def _log_start(line: str) -> None:
    path = os.environ.get(START_LOG_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    text = line.strip().removeprefix("acceptrace: ")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{test}: {text}\n")


class TracerProcess:
    """`python -m acceptrace --port P --json F` as a subprocess, stopped by a signal."""

    def __init__(self, port: int | None, json_path: Path, *extra: str) -> None:
        self.json_path = json_path
        self.argv = [
            sys.executable, "-m", "acceptrace", *(["--port", str(port)] if port else []),
            "--json", str(json_path), "--interval", "0.5", *backend_args(), *extra,
        ]
        self.proc: subprocess.Popen[str] | None = None
        self.stderr_lines: list[str] = []
        self.stdout = ""
        self._started = threading.Event()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            if "started in " in line:
                _log_start(line)
            if "acceptrace: tracing " in line:
                self._started.set()
        self._started.set()

    def start(self, timeout: float = 60.0) -> TracerProcess:
        timeout = scaled(timeout)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._started.wait(timeout) or self.proc.poll() is not None:
            waited = time.monotonic() - t0
            # The last thing acceptrace said is the step it was in (it announces each).
            step = self.stderr_lines[-1].strip() if self.stderr_lines else "(nothing printed)"
            exited = self.proc.poll()
            self.stop()
            raise AssertionError(
                "acceptrace did not start: "
                + (f"exited {exited}" if exited is not None
                   else f"not tracing after {waited:.0f} s (timeout {timeout:.0f} s, "
                        f"time scale {TIME_SCALE:.1f})")
                + f"; last step: {step}\n" + "".join(self.stderr_lines))
        return self

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        assert self.proc is not None
        timeout = scaled(timeout)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            raise AssertionError(f"acceptrace did not stop on signal {sig} within "
                                 f"{timeout:.0f} s:\n" + self.stderr) from None
        self.stdout = out or ""
        return self.proc.returncode

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=scaled(timeout))
        self.stdout = out or ""
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def report(self) -> dict:
        return json.loads(self.json_path.read_text())


@pytest.fixture
def tracer(tmp_path: Path) -> Iterator[type[TracerProcess]]:
    started: list[TracerProcess] = []

    class _Tracer(TracerProcess):
        def __init__(self, port: int | None, *extra: str) -> None:
            super().__init__(port, tmp_path / f"run{len(started)}.json", *extra)
            started.append(self)

    yield _Tracer
    for t in started:
        if t.proc is not None and t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


# /proc/net/tcp states of a socket that may still send a packet to the listener
# on its own (a retransmitted SYN, final ACK or FIN; a FIN not sent yet): SYN_SENT,
# SYN_RECV (request sockets are listed too), ESTABLISHED, FIN_WAIT1, CLOSE_WAIT,
# LAST_ACK, CLOSING. FIN_WAIT2, TIME_WAIT and CLOSE only answer.
IN_FLIGHT_STATES = frozenset({"01", "02", "03", "04", "08", "09", "0B"})


def sockets_in_flight(port: int) -> int:
    """Sockets from or to `port` (IPv4 and IPv6) in an IN_FLIGHT_STATES state."""
    hexport = f"{port:04X}"
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if f[3] in IN_FLIGHT_STATES and hexport in (f[1].rsplit(":", 1)[1],
                                                         f[2].rsplit(":", 1)[1]):
                n += 1
    return n


def settle(counters: tuple[str, ...], quiet_s: float = 1.5, timeout: float = 20.0,
           port: int | None = None) -> None:
    """Wait until the kernel's counters have not moved for quiet_s and, given a
    port, no connection of it can still send: a client whose final ACK was
    dropped retransmits it (or its FIN) with a backoff longer than quiet_s, and
    that one lands after the tracer stopped, counted by the kernel only."""
    last = {k: read_netstat()[k] for k in counters}
    since = time.monotonic()
    end = since + scaled(timeout)
    while time.monotonic() < end:
        time.sleep(0.1)
        now = {k: read_netstat()[k] for k in counters}
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s and (port is None or not sockets_in_flight(port)):
            return


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
