"""A start's own bookkeeping: where its time goes, what it remembers per boot,
and the guest's calibrated timeouts (pure parts; the real starts are in the
root suites)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from acceptrace import bootmemo, kernel, runner

VM_DIR = Path(__file__).resolve().parent / "vm"


def _load(name: str):
    path = VM_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"acceptrace_startup_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_process_start_is_before_now_and_after_boot():
    t0 = runner.process_start_monotonic()
    assert t0 <= time.monotonic()
    # this interpreter has run for less than the whole test session has
    assert time.monotonic() - t0 < 3600


def test_start_clock_names_each_step_and_sums_them():
    clock = runner.StartClock()
    clock.step("prepare")
    time.sleep(0.2)
    clock.step("load")
    names = [n for n, _ in clock.steps]
    assert names == ["python", "prepare", "load"]
    assert dict(clock.steps)["load"] >= 0.2
    line = clock.line()
    assert line.startswith("started in ") and "load 0.2 s" in line
    total = float(line.split()[2])
    assert total == pytest.approx(sum(s for _, s in clock.steps), abs=0.1)


def test_boot_memo_round_trip_and_boot_id(tmp_path, monkeypatch):
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", tmp_path / "memo")
    m = bootmemo.BootMemo("probe")
    assert m.get() is None
    m.put("refused: E2BIG")
    assert bootmemo.BootMemo("probe").get() == "refused: E2BIG"
    assert bootmemo.BootMemo("other").get() is None
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert [p.name for p in (tmp_path / "memo").iterdir()] == [f"probe.{boot_id}"]


def test_boot_memo_forgets_another_boot(tmp_path, monkeypatch):
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", tmp_path)
    (tmp_path / "probe.00000000-dead-beef-0000-000000000000").write_text("old kernel\n")
    assert bootmemo.BootMemo("probe").get() is None


def test_boot_memo_unwritable_dir_remembers_nothing(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", blocker / "sub")
    m = bootmemo.BootMemo("probe")
    m.put("x")   # no exception
    assert m.get() is None


def test_boot_memo_ignores_a_file_others_may_write(tmp_path, monkeypatch):
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", tmp_path)
    m = bootmemo.BootMemo("probe")
    m.put("ok")
    assert m.path is not None and m.path.stat().st_mode & 0o777 == 0o600
    assert m.get() == "ok"
    m.path.chmod(0o666)
    assert m.get() is None


def test_kernel_facts_round_trip_and_are_remembered(tmp_path, monkeypatch):
    """The running kernel's BTF facts, worked out once, then read back as they were;
    a memo that is not facts (a define that is not an int) is worked out again."""
    monkeypatch.setattr(bootmemo.BootMemo, "DIR", tmp_path / "memo")
    tracefs = tmp_path / "tracefs"  # empty: every tracepoint missing, which is a fact too
    tracefs.mkdir()
    fresh = kernel.compute_facts(tracefs)
    assert kernel.KernelFacts.from_json(fresh.to_json()) == fresh
    facts, remembered = kernel.kernel_facts(tracefs)
    assert (facts, remembered) == (fresh, False)
    facts, remembered = kernel.kernel_facts(tracefs)
    assert (facts, remembered) == (fresh, True)
    memo = bootmemo.BootMemo(kernel.FACTS_MEMO + kernel.facts_fingerprint(tracefs))
    assert memo.path is not None
    bad = json.loads(memo.path.read_text())
    bad["defines"]["AT_OFF_SK_STATE"] = "0); evil(("
    memo.path.write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        kernel.KernelFacts.from_json(memo.path.read_text())
    facts, remembered = kernel.kernel_facts(tracefs)
    assert (facts, remembered) == (fresh, False)
    assert [p.name for p in (tmp_path / "memo").iterdir()] == [memo.path.name]


def test_calibration_scale_and_factor_bounds(monkeypatch, capsys):
    cal = _load("calibrate")
    for seconds, scale, factor in [
        (cal.HOST_REFERENCE_S / 2, 1.0, 1.0),                          # faster host: never below 1
        (cal.HOST_REFERENCE_S * 5, 5.0, 1.0),                          # slower, still < quiet guest
        (cal.HOST_REFERENCE_S * cal.QUIET_GUEST_SCALE * 2, cal.QUIET_GUEST_SCALE * 2, 2.0),
        (cal.HOST_REFERENCE_S * 1000, 1000.0, cal.MAX_BACKEND_FACTOR),   # capped
    ]:
        monkeypatch.setattr(cal, "measure", lambda s=seconds: s)
        cal.main()
        out = dict(kv.split("=") for kv in capsys.readouterr().out.split())
        assert float(out["scale"]) == pytest.approx(scale, rel=0.01), (seconds, out)
        assert float(out["backend_factor"]) == pytest.approx(factor, rel=0.01), (seconds, out)


def test_calibration_measures_something():
    cal = _load("calibrate")
    assert 0 < cal.measure(runs=1) < 60


def test_backend_status_with_calibrated_timeout(tmp_path):
    run = _load("run")
    (tmp_path / "6.1-fentry.status").write_text("rc=124 seconds=2701.3 timeout=2700 scale=27.50\n")
    (tmp_path / "6.1-fentry.xml").write_text("<testsuites><testsuite>")   # cut off by the kill
    br = run._backend_result(tmp_path, "6.1", "fentry")
    assert (br.rc, br.seconds, br.timeout, br.scale) == (124, 2701.3, 2700, 27.5)
    assert br.cases == []


def test_guest_deadline_leaves_room_for_the_largest_backend_factor():
    run = _load("run")
    plan = run.MATRIX["6.12"]
    timeouts = [plan.timeout(b) for b in plan.backends]
    deadline = run.guest_timeout(timeouts, True)
    assert deadline > sum(timeouts) * run.MAX_BACKEND_FACTOR


def test_each_lab_scenario_runs_in_one_fentry_cell_with_its_own_time():
    run = _load("run")
    lab = [t for k in run.LAB_TESTS for t in run.LAB_TESTS[k]]
    assert len(lab) == len(set(lab)) == 6   # every scenario's test, once
    for label, plan in run.MATRIX.items():
        assert plan.tests("fentry") == run.GUEST_TESTS + run.LAB_TESTS[label]
        assert plan.timeout("fentry") == (run.BACKEND_TIMEOUTS["fentry"]
                                          + run.LAB_TIMEOUT[label])
        for b in plan.backends:
            if b != "fentry":
                assert plan.tests(b) == run.BACKEND_TESTS[b]
                assert plan.timeout(b) == run.BACKEND_TIMEOUTS[b]


def test_every_backend_test_list_names_real_tests():
    """A node id in BACKEND_TESTS that names no test would be skipped silently by
    the guest's pytest ("not found"): each one must be collected here."""
    run = _load("run")
    ids = sorted({t for tests in run.BACKEND_TESTS.values() for t in tests}
                 | {t for plan in run.MATRIX.values() for b in plan.backends
                    for t in plan.tests(b)})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", *ids],
                          capture_output=True, text=True, cwd=VM_DIR.parent.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = set(proc.stdout.split())
    for t in ids:
        assert t in collected or any(c.startswith((t + "::", t + "[")) for c in collected), t


def test_start_summary_median_and_slowest():
    run = _load("run")
    text = ("tests/a.py::t1: started in 20.0 s (python 3.0 s, load 15.0 s)\n"
            "tests/a.py::t2: started in 48.8 s (python 3.7 s, load 40.0 s)\n"
            "tests/a.py::t3: started in 25.5 s (python 3.1 s, load 19.0 s)\n")
    line = run.start_summary(text)
    assert line.startswith("acceptrace starts: 3, median 25.5 s, slowest 48.8 s ")
    assert line.endswith("(python 3.7 s, load 40.0 s) in tests/a.py::t2")
    assert run.start_summary("") == ""


def test_sigint_timeout_keeps_pytest_summary_and_junit(tmp_path):
    """The guest ends a backend's pytest as guest-init.sh does (timeout -s INT):
    the failure summary and the junit file of the tests that finished survive.

    The timeout is made to expire once the hanging test's faulthandler dump is out
    (SIGALRM is what timeout(1) expires on), not after a fixed time: a busy machine
    took most of a fixed 4 s to start pytest, and the hang was cut before its dump."""
    import signal

    if not shutil.which("timeout"):
        pytest.skip("no coreutils timeout")
    (tmp_path / "test_hang.py").write_text(
        "import socket\n"
        "def test_done():\n    assert True\n"
        "def test_hangs():\n"
        "    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); s.accept()\n")
    junit = tmp_path / "j.xml"
    out_f, err_f = tmp_path / "out.txt", tmp_path / "err.txt"
    with out_f.open("w") as out_w, err_f.open("w") as err_w:
        proc = subprocess.Popen(
            ["timeout", "-s", "INT", "-k", "20", "300", sys.executable, "-m", "pytest",
             "-p", "no:cacheprovider", "-v", "-rA", "-o", "faulthandler_timeout=2",
             f"--junitxml={junit}", str(tmp_path / "test_hang.py")],
            stdout=out_w, stderr=err_w, text=True, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 120
            while "Timeout" not in err_f.read_text() + out_f.read_text():
                assert proc.poll() is None, out_f.read_text()[-2000:]
                assert time.monotonic() < deadline, "no faulthandler dump in 120 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGALRM)      # the timeout expires now
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = out_f.read_text() + err_f.read_text()
    assert rc == 124, out[-2000:]
    assert "KeyboardInterrupt" in out and "short test summary info" in out, out[-2000:]
    assert "Timeout" in out and "test_hangs" in out, out[-2000:]   # faulthandler's dump
    assert "test_done" in junit.read_text()


def test_sockets_in_flight_sees_a_connection_until_it_is_closed():
    """settle(port=...) waits on this: an open connection (both ends) is in flight,
    a closed one (TIME_WAIT, FIN_WAIT2) is not; other ports never count."""
    import socket

    from conftest import sockets_in_flight

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        assert sockets_in_flight(port) == 0  # LISTEN alone sends nothing
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        assert sockets_in_flight(port) == 2
        assert sockets_in_flight(port + 1 if port < 65535 else port - 1) == 0
        conn.close()
        cli.close()
        deadline = time.monotonic() + 5
        while sockets_in_flight(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sockets_in_flight(port) == 0
    finally:
        srv.close()


def test_a_guest_that_died_booting_is_told_from_one_that_failed_later(tmp_path):
    """Only a kernel that panicked before the guest's init said anything is booted again
    (a TCG fault at boot); a guest that ran tests and then died is a result as it is."""
    run = _load("run")
    console = tmp_path / "console.log"
    console.write_text("[    5.66] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n"
                       "[    5.66] RIP: 0010:sched_clock_cpu+0x9/0x190\n"
                       "[    5.67] Kernel panic - not syncing: Fatal exception in interrupt\n")
    assert run._died_booting(tmp_path)
    assert "sched_clock_cpu" in run._panic_line(console)
    console.write_text("acceptrace-vm: 6.12: bcc: 0.26.0\n[  90.1] Kernel panic - not syncing\n")
    assert not run._died_booting(tmp_path)
    console.unlink()
    assert not run._died_booting(tmp_path)


def test_a_locked_up_guest_kernel_is_quoted(tmp_path):
    """A backend that timed out because the guest kernel locked up says so (CI's 6.1
    guest: both vCPUs stuck for 514 s while fentry programs were detached)."""
    run = _load("run")
    console = tmp_path / "console.log"
    console.write_text("acceptrace-vm: 6.1: bcc: 0.26.0\n"
                       "[  778.52] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n"
                       "[  805.33] watchdog: BUG: soft lockup - CPU#0 stuck for 45s! "
                       "[python3:407]\n")
    said = run.kernel_complaints(console)
    assert "detected stalls" in said and "soft lockup - CPU#0" in said
    console.write_text("acceptrace-vm: 6.1: bcc: 0.26.0\nall quiet\n")
    assert run.kernel_complaints(console) == ""
    assert run.kernel_complaints(tmp_path / "none.log") == ""
