"""Probes a killed BCC process left in tracefs (tracer/stale.py): parsed from the
kernel's own line formats, removed only for dead pids, by appending -:group/name.
No root: a directory stands in for tracefs (the root test in test_faults.py uses
the real one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from acceptrace import selection
from acceptrace.errors import UserError
from acceptrace.stale import describe, parse_events, remove_stale, stale_events

# What kprobe_events shows for BCC's probes (trace_kprobe_show: 'r', the maxactive,
# group/name, the symbol): acceptrace's kretprobes with maxactive 512, an entry
# probe, a probe of another tool, and one not made by BCC at all.
KPROBE_EVENTS = """\
r512:kprobes/r_inet_csk_accept_bcc_4242 inet_csk_accept
r512:kprobes/r_tcp_recvmsg_bcc_4242 tcp_recvmsg
p:kprobes/p_tcp_conn_request_bcc_4242 tcp_conn_request
r:kprobes/r_tcp_v4_syn_recv_sock_bcc_777 tcp_v4_syn_recv_sock
p:kprobes/p_do_sys_open_bcc_31337 do_sys_open+4
p:kprobes/myprobe do_sys_open
r:perf/r_tcp_v4_connect_bcc_x tcp_v4_connect
"""
# uprobe_events (trace_uprobe_show: group/name path:0x%016lx, then a ref_ctr).
UPROBE_EVENTS = """\
p:uprobes/p__usr_lib_python3_dist_packages_httptools_parser_parser_so_0x1a2b_bcc_4242 \
/usr/lib/python3/dist-packages/httptools/parser/parser.so:0x0000000000001a2b
p:uprobes/p__proc_99_root_opt_venv_lib_parser_so_0x40_bcc_777 \
/proc/99/root/opt/venv/lib/parser.so:0x0000000000000040(0x10)
p:uprobes/p__usr_bin_bash_0x10_bcc_31337 /bin/bash:0x0000000000000010
"""


def test_parse_the_kernels_formats():
    k = parse_events(KPROBE_EVENTS, "kprobe_events")
    assert [(e.group, e.name, e.pid) for e in k] == [
        ("kprobes", "r_inet_csk_accept_bcc_4242", 4242),
        ("kprobes", "r_tcp_recvmsg_bcc_4242", 4242),
        ("kprobes", "p_tcp_conn_request_bcc_4242", 4242),
        ("kprobes", "r_tcp_v4_syn_recv_sock_bcc_777", 777),
        ("kprobes", "p_do_sys_open_bcc_31337", 31337),
    ]  # "myprobe" and "_bcc_x" are not BCC's per-pid events: never touched
    assert k[0].command == "-:kprobes/r_inet_csk_accept_bcc_4242"
    u = parse_events(UPROBE_EVENTS, "uprobe_events")
    assert [e.pid for e in u] == [4242, 777, 31337]
    assert u[1].command == "-:uprobes/p__proc_99_root_opt_venv_lib_parser_so_0x40_bcc_777"


@pytest.fixture
def tracefs(tmp_path: Path) -> Path:
    (tmp_path / "kprobe_events").write_text(KPROBE_EVENTS)
    (tmp_path / "uprobe_events").write_text(UPROBE_EVENTS)
    return tmp_path


def test_only_dead_pids_are_stale(tracefs):
    dead = {4242, 777}
    found = stale_events(tracefs, alive=lambda pid: pid not in dead)
    assert {e.pid for e in found} == dead
    assert len(found) == 6  # 4 kprobes of 4242 and 777, 2 uprobes
    assert stale_events(tracefs, alive=lambda pid: True) == []


def test_remove_appends_one_command_per_dead_event_and_keeps_the_rest(tracefs):
    removed, failed = remove_stale(tracefs, alive=lambda pid: pid == 31337)
    assert failed == []
    assert len(removed) == 6
    # appended (a fake file keeps its text; the kernel would delete the events)
    k = (tracefs / "kprobe_events").read_text()
    assert k.startswith(KPROBE_EVENTS)
    assert k[len(KPROBE_EVENTS):].splitlines() == [
        "-:kprobes/r_inet_csk_accept_bcc_4242", "-:kprobes/r_tcp_recvmsg_bcc_4242",
        "-:kprobes/p_tcp_conn_request_bcc_4242", "-:kprobes/r_tcp_v4_syn_recv_sock_bcc_777"]
    u = (tracefs / "uprobe_events").read_text()[len(UPROBE_EVENTS):].splitlines()
    assert u == [e.command for e in removed if e.file == "uprobe_events"]
    assert not any("31337" in line for line in k.splitlines()[7:] + u)
    assert describe(removed, failed) == [
        "removed 6 probes left in tracefs by killed BCC processes (pids 777, 4242)"]


def test_own_pid_is_never_stale(tmp_path):
    (tmp_path / "uprobe_events").write_text(
        f"p:uprobes/p_x_0x1_bcc_{os.getpid()} /bin/true:0x0000000000000001\n")
    assert stale_events(tmp_path, alive=lambda pid: False) == []


def test_a_pid_that_comes_back_is_kept(tracefs):
    seen: list[int] = []

    def alive(pid: int) -> bool:  # dead when listed, alive when looked at again
        seen.append(pid)
        return seen.count(pid) > 1

    removed, _ = remove_stale(tracefs, alive=alive)
    assert removed == []


def test_no_tracefs_files_no_kprobes(tmp_path):
    assert stale_events(tmp_path) == []   # CONFIG_KPROBES off: no kprobe_events
    assert remove_stale(tmp_path) == ([], [])
    assert describe([], []) == []


def test_a_removal_the_kernel_refuses_is_reported(tracefs, monkeypatch):
    """The kernel answers EBUSY for an event still attached (a BCC process of another
    PID namespace whose pid is free in ours): kept, and said."""
    import errno

    from acceptrace import stale

    def busy(fd: int, data: bytes) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(stale.os, "write", busy)
    removed, failed = remove_stale(tracefs, alive=lambda pid: pid == 31337)
    assert removed == [] and len(failed) == 6
    assert failed[0] == "kprobes/r_inet_csk_accept_bcc_4242: Device or resource busy"
    assert describe(removed, failed) == [
        "could not remove 6 stale probes (kprobes/r_inet_csk_accept_bcc_4242: Device or "
        "resource busy, ...)"]


@pytest.mark.parametrize("env, value, ok", [
    ("ACCEPTRACE_RINGBUF_PAGES", "1", True), ("ACCEPTRACE_RINGBUF_PAGES", "64", True),
    ("ACCEPTRACE_RINGBUF_PAGES", "3", False), ("ACCEPTRACE_RINGBUF_PAGES", "0", False),
    ("ACCEPTRACE_RINGBUF_PAGES", "-4", False), ("ACCEPTRACE_RINGBUF_PAGES", "8); evil(", False),
    ("ACCEPTRACE_CONN_MAX", "100", True), ("ACCEPTRACE_CONN_MAX", "0", False),
    ("ACCEPTRACE_CONN_MAX", "1e3", False), ("ACCEPTRACE_CONN_MAX", str(1 << 25), False),
])
def test_test_knobs_are_validated(monkeypatch, env, value, ok):
    monkeypatch.setenv(env, value)
    if ok:
        knobs = selection.test_knobs()
        key = "AT_RINGBUF_PAGES" if "RINGBUF" in env else "AT_CONN_MAX"
        assert knobs[key] == int(value)
    else:
        with pytest.raises(UserError, match=env):
            selection.test_knobs()


def test_test_knobs_default(monkeypatch):
    monkeypatch.delenv("ACCEPTRACE_RINGBUF_PAGES", raising=False)
    monkeypatch.delenv("ACCEPTRACE_CONN_MAX", raising=False)
    assert selection.test_knobs() == {"AT_CONN_MAX": selection.CONN_MAX,
                                      "AT_RINGBUF_PAGES": selection.RINGBUF_PAGES}
