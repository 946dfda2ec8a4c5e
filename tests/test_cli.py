"""The command line: bad input, missing prerequisites, signals, and clean exit."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT
from helpers import listener, ours_attached, run_cli


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("acceptrace: ")
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "port, needle",
    [("0", "1 to 65535"), ("65536", "1 to 65535"), ("-5", "1 to 65535"),
     ("http", "number"), ("80.5", "number"), ("", "number")],
)
def test_bad_port(port, needle):
    assert_one_line_error(run_cli("--port", port), needle)


def test_bad_duration_and_interval():
    assert_one_line_error(run_cli("--port", "80", "--duration", "0"), "--duration")
    assert_one_line_error(run_cli("--port", "80", "--interval", "-1"), "--interval")
    assert_one_line_error(run_cli("--port", "80", "--duration", "soon"), "duration")


def test_unknown_option_is_one_line():
    assert_one_line_error(run_cli("--prot", "80"), "--prot")


def test_all_namespaces_with_one_namespace_is_one_line():
    res = run_cli("--all-namespaces", "--pid", "1")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "acceptrace: --all-namespaces traces every namespace: leave out --pid and --netns")


def test_help_shows_every_listener_mode():
    res = run_cli("--help")
    assert res.returncode == 0
    assert "every TCP listener" in res.stdout and "--all-namespaces" in res.stdout


def test_report_of_missing_and_bad_files(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path / "nope.json")), "cannot read")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "something/else"}')
    assert_one_line_error(run_cli("report", str(bad)), "not an acceptrace report")


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_not_root_in_process(monkeypatch, capsys):
    """The same check, in-process with another euid (runs wherever the repo lives)."""
    from acceptrace import cli

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["--port", "8000"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("acceptrace: must run as root")


def nobody_can_run_python() -> bool:
    if not IS_ROOT or not shutil.which("setpriv"):
        return False
    return subprocess.run([*NOBODY, sys.executable, "-c", "import acceptrace"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not nobody_can_run_python(),
                    reason="nobody cannot run this python here (checkout not world-readable)")
def test_not_root():
    res = run_cli("--port", "8000", prefix=NOBODY)
    assert_one_line_error(res, "must run as root")
    assert res.returncode == 1


@pytest.mark.root
def test_no_bcc(tmp_path):
    # A bcc package that fails to import stands in for a machine without BCC.
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named bcc')\n")
    res = run_cli("--port", "8000", env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(res, "BCC", "python3-bpfcc")


@pytest.mark.root
def test_no_btf(tmp_path):
    res = run_cli("--port", "8000", env={"ACCEPTRACE_BTF": str(tmp_path / "vmlinux")})
    assert_one_line_error(res, "no BTF", "CONFIG_DEBUG_INFO_BTF")


@pytest.mark.root
def test_tracefs_unmounted_is_mounted(tmp_path):
    """In a private mount namespace without tracefs, acceptrace mounts it and runs."""
    script = (
        # debugfs too: with it mounted, /sys/kernel/debug/tracing automounts tracefs.
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
        "umount /sys/kernel/debug 2>/dev/null; "
        "test ! -e /sys/kernel/tracing/events || exit 99; "
        f"exec {sys.executable} -m acceptrace --port 1 --duration 0.5"
    )
    res = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "mounted tracefs at /sys/kernel/tracing" in res.stderr


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_json_and_detaches(tracer, sig):
    srv = listener(8)
    port = srv.getsockname()[1]
    assert ours_attached() == 0
    t = tracer(port).start()
    try:
        assert ours_attached() >= 6
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", port))
            srv.accept()[0].close()
            c.close()
        time.sleep(0.3)
    finally:
        rc = t.stop(sig)
        srv.close()
    assert rc == 0, t.stderr
    run = t.report()
    assert run["schema"] == "acceptrace/v1"
    assert run["connections"]["accepted"] == 3
    assert "Traceback" not in t.stderr
    assert "accept_queue" in t.stdout  # the final summary was printed
    assert not list(t.json_path.parent.glob("*.tmp*")), "temporary file left behind"
    assert ours_attached() == 0, "BPF programs still loaded after exit"


@pytest.mark.root
def test_duration_expiry_and_no_listener(tracer, tmp_path):
    """--duration ends the run by itself; a port nobody listens on is a warning."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # now nothing listens there
    t = tracer(port, "--duration", "1.5")
    t.start()
    assert t.wait(timeout=60) == 0, t.stderr
    assert "nothing is listening on port" in t.stderr
    run = t.report()
    assert run["meta"]["port"] == port
    assert 1.0 <= run["meta"]["duration_s"] <= 5
    assert run["connections"]["accepted"] == 0
    assert ours_attached() == 0


@pytest.mark.root
def test_doctor():
    res = run_cli("doctor")
    assert res.returncode == 0, res.stdout + res.stderr
    for needle in ("BTF", "tracefs", "kprobe backend", "fentry backend", "header tree", "BCC",
                   "tracepoint backend", "function tcp_conn_request", "backend:"):
        assert needle in res.stdout, needle


@pytest.mark.root
def test_doctor_fails_without_btf(tmp_path):
    res = run_cli("doctor", env={"ACCEPTRACE_BTF": str(tmp_path / "none")})
    assert res.returncode == 1
    assert "no BTF" in res.stdout


@pytest.mark.root
def test_report_renders_saved_run(tracer):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    t = tracer(port).start()
    try:
        c = socket.create_connection(("127.0.0.1", port))
        srv.accept()[0].close()
        c.close()
        time.sleep(0.2)
    finally:
        assert t.stop() == 0
        srv.close()
    res = run_cli("report", str(t.json_path))
    assert res.returncode == 0, res.stderr
    assert "accept_queue" in res.stdout and str(port) in res.stdout
    # Round trip: the model reads and writes the same JSON.
    from acceptrace.model import Run

    original = json.loads(Path(t.json_path).read_text())
    assert Run.from_json(original).to_json() == original



def test_report_of_one_listener(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"
    port = json.loads(fixture.read_text())["meta"]["port"]
    res = run_cli("report", str(fixture), "--port", str(port))
    assert res.returncode == 0 and "accept queue overflowed" in res.stdout
    res = run_cli("report", str(fixture), "--port", "1")
    assert res.returncode == 2
    assert res.stderr.strip() == f"acceptrace: {fixture} has no listener on port 1"
