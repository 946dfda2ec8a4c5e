"""Every diagnosis rule: fires on the figures that mean it, stays quiet otherwise."""

from __future__ import annotations

import pytest
from acceptrace.diagnose import diagnose
from acceptrace.hist import Histogram
from acceptrace.model import ProcessCount, Run


def base_run(**drops: int | None) -> Run:
    run = Run.new(port=8000, backend="tracepoint")
    run.connections = {"syn": 100, "queued": 100, "accepted": 100, "read": 100}
    run.drops.update({"listen_overflow": 0, "syn_dropped": 0, "ack_dropped": 0,
                      "synack_retransmits": 0, "syncookies": 0, "lost_events": 0})
    run.drops.update(drops)
    run.queues.backlog = 2048
    for name in run.stages:
        for _ in range(100):
            run.stages[name].add(50)
    return run


def rules(run: Run) -> set[str]:
    return {f.rule for f in diagnose(run)}


def with_stage(run: Run, stage: str, us: float) -> Run:
    h = Histogram.empty("us")
    for _ in range(100):
        h.add(us)
    run.stages[stage] = h
    return run


def test_healthy():
    fs = diagnose(base_run())
    assert [f.rule for f in fs] == ["healthy"]
    assert "100 connections" in fs[0].text


def test_overflow_with_wait_and_advice():
    run = with_stage(base_run(listen_overflow=312, syn_dropped=300, ack_dropped=12),
                     "accept_queue", 840_000)
    fs = {f.rule: f for f in diagnose(run)}
    text = fs["accept_queue_overflow"].text
    assert "overflowed 312 times" in text and "840 ms" in text and "backlog 2048" in text
    assert "event loop is blocked" in text and "workers" in text
    assert fs["accept_queue_overflow"].severity == "critical"
    assert "300 SYNs" in fs["syn_dropped"].text and "1 s" in fs["syn_dropped"].text
    assert "12 final ACKs" in fs["ack_dropped"].text
    assert "healthy" not in fs


def test_slow_accept_without_overflow():
    assert "accept_queue_slow" in rules(with_stage(base_run(), "accept_queue", 150_000))
    assert "accept_queue_slow" not in rules(with_stage(base_run(), "accept_queue", 20_000))


@pytest.mark.parametrize("somaxconn, server, needle", [
    (64, None, "net.core.somaxconn (64) of the namespace caps it"),
    (4096, None, "it is the backlog the server passes to listen(), clamped by "
                 "net.core.somaxconn (4096 in the namespace)"),
    (4096, "uvicorn", "uvicorn's default is 2048 (--backlog), clamped by net.core.somaxconn "
                      "(4096 in the namespace)"),
    (4096, "nginx", "nginx's default is 511 (listen ... backlog=N)"),
    (4096, "hypercorn", "hypercorn's default is 100 (--backlog)"),
    (4096, "granian", "granian's default is 1024 (--backlog)"),
    (4096, "node", "node's default is 511 (server.listen(port, host, backlog))"),
    (4096, "socketserver", "socketserver's default is 5 (request_queue_size"),
    (4096, "unknown", "it is the backlog the server passes to listen()")])
def test_small_backlog(somaxconn, server, needle):
    run = base_run(listen_overflow=5, syn_dropped=5)
    run.queues.backlog = 64
    run.meta.somaxconn = somaxconn
    if server is not None:
        run.processes = [ProcessCount(7, "x", 10, server=server)]
    f = {x.rule: x for x in diagnose(run)}["small_backlog"]
    assert needle in f.text
    if server != "uvicorn":
        assert "uvicorn" not in f.text  # no uvicorn advice for another server
    run.queues.backlog = 1024
    assert "small_backlog" not in rules(run)


@pytest.mark.parametrize("server, worker_class, needles", [
    ("nginx", None, ("served by nginx", "listen ... backlog=N (default 511; 8 here)",
                     "worker_processes (default 1; auto: one per CPU",
                     "net.core.somaxconn (4096 in the namespace)", "2 processes accepted here")),
    ("gunicorn", "sync", ("served by gunicorn (worker class sync)", "--backlog (default 2048",
                          "-w/--workers", "-k gthread")),
    ("gunicorn", "uvicorn.workers.UvicornWorker", ("--backlog (default 2048",)),
    ("hypercorn", None, ("--backlog (default 100", "-w/--workers")),
    ("granian", None, ("--backlog (default 1024, on each worker's own SO_REUSEPORT socket",
                       "--workers")),
])
def test_server_options_in_its_own_terms(server, worker_class, needles):
    run = base_run(listen_overflow=5, syn_dropped=5)
    run.queues.backlog = 8
    run.meta.somaxconn = 4096
    run.processes = [ProcessCount(7, "w", 10, server=server, worker_class=worker_class),
                     ProcessCount(8, "w", 9, server=server, worker_class=worker_class)]
    f = {x.rule: x for x in diagnose(run)}["server_options"]
    for needle in needles:
        assert needle in f.text, (needle, f.text)
    if worker_class != "sync":
        assert "-k gthread" not in f.text
    # a slow accept queue without overflow gets the same advice; a healthy run none
    run = with_stage(base_run(), "accept_queue", 150_000)
    run.processes = [ProcessCount(7, "w", 10, server=server)]
    assert "server_options" in rules(run)
    run.stages["accept_queue"] = base_run().stages["accept_queue"]
    assert "server_options" not in rules(run)


def test_unknown_server_gets_the_generic_sentence():
    run = with_stage(base_run(listen_overflow=5, syn_dropped=5), "accept_queue", 840_000)
    run.processes = [ProcessCount(7, "myserver", 10, server="unknown")]
    fs = {f.rule: f for f in diagnose(run)}
    assert "server_options" not in fs
    assert "event loop is blocked or there are too few workers" in \
        fs["accept_queue_overflow"].text
    # the server that accepted most is the one named
    run.processes = [ProcessCount(7, "a", 3, server="hypercorn"),
                     ProcessCount(8, "b", 30, server="nginx")]
    assert "served by nginx" in {f.rule: f for f in diagnose(run)}["server_options"].text


def test_syncookies_and_synack_retransmits():
    assert "syncookies" in rules(base_run(syncookies=7))
    assert "synack_retransmits" in rules(base_run(synack_retransmits=3))
    # retransmits caused by ACK overflow are explained by that rule instead
    assert "synack_retransmits" not in rules(base_run(synack_retransmits=3, ack_dropped=3,
                                                      listen_overflow=3))


def test_thresholds_follow_the_machines_slowness():
    """diagnose(run, slowness): on a machine 10 times slower (the lab's stretch) a wait is
    slow at 10 times the threshold; slowness below 1 is a real machine's."""
    run = with_stage(with_stage(with_stage(base_run(), "accept_queue", 150_000),
                                "accept_to_read", 80_000), "handshake", 300_000)
    slow = ("accept_queue_slow", "accept_to_read_slow", "handshake_slow")
    assert set(slow) <= rules(run)
    assert not set(slow) & {f.rule for f in diagnose(run, 10.0)}
    assert {f.rule for f in diagnose(run, 0.5)} == rules(run)
    run = with_stage(base_run(), "accept_queue", 1_500_000)
    assert "accept_queue_slow" in {f.rule for f in diagnose(run, 10.0)}


def test_slow_handshake_and_read():
    assert "handshake_slow" in rules(with_stage(base_run(), "handshake", 300_000))
    assert "accept_to_read_slow" in rules(with_stage(base_run(), "accept_to_read", 80_000))
    assert "accept_to_read_slow" not in rules(with_stage(base_run(), "accept_to_read", 5_000))


def test_unbalanced_workers():
    run = base_run()
    run.processes = [ProcessCount(1, "uvicorn", 900), ProcessCount(2, "uvicorn", 100)]
    assert "workers_unbalanced" in rules(run)
    run.processes = [ProcessCount(1, "uvicorn", 520), ProcessCount(2, "uvicorn", 480)]
    assert "workers_unbalanced" not in rules(run)


def test_softirqs_busy_says_counts_may_be_short():
    run = base_run()
    assert "softirqs_busy" not in rules(run)
    run.extra["softirqs_busy"] = None  # not countable on this kernel: no sentence
    assert "softirqs_busy" not in rules(run)
    run.extra["softirqs_busy"] = 3
    text = next(f.text for f in diagnose(run) if f.rule == "softirqs_busy")
    assert text.startswith("3 network/timer softirqs") and "kernel_counters" in text
    assert "packets" not in text
    run.extra["packets_unseen"] = 7
    text = next(f.text for f in diagnose(run) if f.rule == "softirqs_busy")
    assert "7 packets to the port arrived in them" in text


def test_lost_events_and_no_traffic():
    assert "lost_events" in rules(base_run(lost_events=4))
    run = base_run()
    run.connections["accepted"] = 0
    assert "no_traffic" in rules(run)


def test_nulls_do_not_fire():
    run = base_run(listen_overflow=None, syn_dropped=None, ack_dropped=None)
    assert rules(run) == {"healthy"}


def test_first_syn_dropped_is_said_with_its_count():
    run = base_run()
    run.connections["syn_retried"] = 37
    fs = [f for f in diagnose(run) if f.rule == "syn_retried"]
    assert len(fs) == 1
    assert fs[0].text.startswith("37 connections waited ≥ 1 s because their first SYN was dropped")
    run.connections["syn_retried"] = 1
    assert "1 connection waited" in [f for f in diagnose(run) if f.rule == "syn_retried"][0].text
    for quiet in (0, None):   # none retried, or a backend that cannot tell
        run.connections["syn_retried"] = quiet
        assert "syn_retried" not in rules(run)


def test_syn_queue_full_without_syncookies():
    assert "syn_dropped_synq_full" in rules(base_run(syn_dropped_synq_full=12))
    assert "syn_dropped_synq_full" not in rules(base_run(syn_dropped_synq_full=None))


def test_other_listeners_overflows_in_the_namespace_are_named():
    run = base_run(listen_overflow=5, syn_dropped=5)
    run.meta.netns = {"inode": 4026532000, "name": "ip netns blue", "pid": None}
    run.kernel_counters["TcpExtListenOverflows"] = 545
    f = {x.rule: x for x in diagnose(run)}["other_listeners_overflow"]
    assert "ip netns blue counted 545" in f.text and "the other 540" in f.text
    run.kernel_counters["TcpExtListenOverflows"] = 5
    assert "other_listeners_overflow" not in rules(run)


def test_somaxconn_of_the_traced_namespace():
    run = base_run(listen_overflow=5, syn_dropped=5)
    run.queues.backlog = run.meta.somaxconn = 64
    run.meta.netns = {"inode": 4026532000, "name": "pid 4242", "pid": 4242}
    f = {x.rule: x for x in diagnose(run)}["small_backlog"]
    assert "net.core.somaxconn (64) of the namespace of pid 4242 caps it" in f.text


def test_skipped_runs_are_named_with_what_they_feed():
    from acceptrace.model import Cost, ProgramCost

    run = base_run()
    run.cost = Cost(stats="BPF_ENABLE_STATS", seconds=1.0, programs=[
        ProgramCost("raw_tracepoint:sock:sk_data_ready", 100, 1000, 3, ["queued"]),
        ProgramCost("tracepoint:syscalls:sys_exit_accept4", 100, 1000, None, ["accepted"])])
    f = next(f for f in diagnose(run) if f.rule == "missed_runs")
    assert "3 of raw_tracepoint:sock:sk_data_ready (feeds queued)" in f.text
    assert "sys_exit_accept4" not in f.text   # not counted there: not claimed as 0 or N
    run.cost.programs[0].missed = 0
    assert "missed_runs" not in rules(run)


def test_untracked_accepts_are_said_beside_a_healthy_run():
    run = base_run()
    run.extra["accept_untracked"] = 236
    fs = diagnose(run)
    assert [f.rule for f in fs] == ["healthy", "accept_untracked"]
    assert fs[1].text.startswith("236 accepted connections have no queue time")
    assert "evicted" in fs[1].text and "accept_queue timed 100 of 100" in fs[1].text
    run.extra["accept_untracked"] = 0
    assert rules(run) == {"healthy"}


# -- the rules the lab's scenarios need (tests/test_lab.py runs them for real) -----------------

def lab_run(**drops: int | None) -> Run:
    run = base_run(**drops)
    run.meta.netns = {"inode": 4026532000, "name": "ip netns atlab", "pid": None}
    return run


def test_backlog_clamped_by_somaxconn():
    from acceptrace.model import Listener

    for clamp in (64, 1024):
        run = lab_run(listen_overflow=9, syn_dropped=9)
        run.queues.backlog = run.meta.somaxconn = clamp
        run.queues.listeners = [Listener("ipv4", "0.0.0.0", 8000, backlog=clamp)]
        f = {x.rule: x for x in diagnose(run)}["backlog_clamped"]
        assert f"limit is {clamp}, exactly net.core.somaxconn of the namespace of ip netns " \
               "atlab" in f.text and "asked for more" in f.text and "9 times" in f.text
    run.queues.backlog = 512                       # asked for less than somaxconn
    assert "backlog_clamped" not in rules(run)
    run.queues.backlog = 1024
    run.drops["listen_overflow"] = 0               # clamped, but never full: no sentence
    assert "backlog_clamped" not in rules(run)
    from acceptrace.hist import Histogram

    run.queues.accept_queue_depth = Histogram.empty("connections")
    run.queues.accept_queue_depth.add(900)         # less than 90 % full: still none
    assert "backlog_clamped" not in rules(run)
    run.queues.accept_queue_depth.add(1000)        # filled to 1000 of 1024: said
    f = {x.rule: x for x in diagnose(run)}["backlog_clamped"]
    assert "filled to 1,000 of its 1,024 places" in f.text and "overflowed" not in f.text
    run.queues.accept_queue_depth = None
    run.drops["listen_overflow"] = None            # a backend that cannot split overflows:
    run.kernel_counters["TcpExtListenOverflows"] = 4   # the namespace's counter
    assert "backlog_clamped" in rules(run)
    run.meta.somaxconn = None                      # unknown: no guess
    assert "backlog_clamped" not in rules(run)


def test_syn_queue_full_from_the_namespaces_counter():
    run = lab_run(syn_dropped_synq_full=None, synack_retransmits=322)
    run.kernel_counters["TcpExtTCPReqQFullDrop"] = 335
    run.meta.sysctls = {"net.ipv4.tcp_syncookies": 0}
    run.connections["accepted"] = 0
    fs = {x.rule: x for x in diagnose(run)}
    f = fs["syn_queue_full"]
    assert f.severity == "critical" and "dropped 335 SYNs" in f.text
    assert "net.ipv4.tcp_syncookies=0" in f.text and "322 SYN-ACK retransmits" in f.text
    assert "no_traffic" not in fs   # nothing was accepted, and the reason is said
    assert "synack_retransmits" not in fs   # not "network loss": the flood's sources
    # fentry/kprobe count it at the kernel's decision: their own rule says it, once
    run.drops["syn_dropped_synq_full"] = 335
    assert "syn_queue_full" not in rules(run) and "syn_dropped_synq_full" in rules(run)
    run.drops["syn_dropped_synq_full"] = None
    run.kernel_counters["TcpExtTCPReqQFullDrop"] = 0
    assert "syn_queue_full" not in rules(run)


def test_abort_on_overflow_says_resets_instead_of_stalls():
    run = lab_run(listen_overflow=30, syn_dropped=22, ack_dropped=8)
    assert "ack_dropped" in rules(run) and "abort_on_overflow" not in rules(run)
    run.meta.sysctls = {"net.ipv4.tcp_abort_on_overflow": 1}
    fs = {x.rule: x for x in diagnose(run)}
    assert "the 8 final ACKs that found the accept queue full were answered with RST" \
        in fs["abort_on_overflow"].text
    assert "ack_dropped" not in fs   # its sentence says they stall: not so here
    run.drops["ack_dropped"] = None  # a backend that cannot tell ACK drops apart
    text = next(f.text for f in diagnose(run) if f.rule == "abort_on_overflow")
    assert "cannot count them" in text
    run.drops.update(listen_overflow=5, syn_dropped=5, ack_dropped=0)
    assert "abort_on_overflow" not in rules(run)   # set, but no final ACK found it full


def test_event_loop_busy_without_overflow():
    run = with_stage(lab_run(), "accept_queue", 49_000)
    f = {x.rule: x for x in diagnose(run)}["event_loop_busy"]
    assert "never overflowed (backlog 2048" in f.text and "49.0 ms or more in the accept" \
        in f.text and "process pool" in f.text
    assert "event_loop_busy" not in rules(with_stage(lab_run(), "accept_queue", 5_000))
    assert "event_loop_busy" in rules(with_stage(lab_run(), "accept_to_read", 12_000))
    # on a machine 10 times slower, a median wait of 12 ms is no busy loop; 120 ms is
    slower = with_stage(lab_run(), "accept_to_read", 12_000)
    assert "event_loop_busy" not in {x.rule for x in diagnose(slower, 10.0)}
    slower = with_stage(lab_run(), "accept_to_read", 120_000)
    assert "event_loop_busy" in {x.rule for x in diagnose(slower, 10.0)}
    # a wait the older rules already name (p99 over their thresholds): said once, by them
    slow = rules(with_stage(lab_run(), "accept_queue", 150_000))
    assert "accept_queue_slow" in slow and "event_loop_busy" not in slow
    # an overflow is the other rules' story
    over = with_stage(lab_run(listen_overflow=3, syn_dropped=3), "accept_queue", 49_000)
    assert "event_loop_busy" not in rules(over)
    # overflows unknown (no split, no namespace counter): no claim of "never overflowed"
    unknown = with_stage(lab_run(listen_overflow=None), "accept_queue", 49_000)
    assert "event_loop_busy" not in rules(unknown)
    few = with_stage(lab_run(), "accept_queue", 49_000)
    few.connections["accepted"] = 5
    assert "event_loop_busy" not in rules(few)


def test_workers_uneven_beyond_chance():
    from acceptrace.model import Listener

    def split(*counts: int, listeners: int = 1) -> Run:
        run = lab_run()
        run.processes = [ProcessCount(i + 1, "python", c) for i, c in enumerate(counts)]
        run.queues.listeners = [Listener("ipv4", "0.0.0.0", 8000, backlog=2048, inode=i)
                                for i in range(listeners)]
        return run

    shared = {f.rule: f for f in diagnose(split(551, 397, 394, 231))}
    assert "workers_uneven" in shared and "workers_unbalanced" not in shared
    assert "551, 397, 394, 231" in shared["workers_uneven"].text
    assert "thundering herd" in shared["workers_uneven"].text
    assert "workers_uneven" not in rules(split(633, 610, 591, 590))     # as even as chance
    assert "workers_uneven" not in rules(split(6, 2, 1, 1))             # too few to tell
    assert rules(split(900, 100)) >= {"workers_unbalanced"}             # said once
    assert "workers_uneven" not in rules(split(900, 100))
    # an even split on one shared socket: the herd is said on its own, and the run is still
    # healthy; an uneven one says it once (workers_uneven); one socket per worker: nothing
    even = {f.rule: f for f in diagnose(split(633, 610, 591, 590))}
    assert set(even) == {"shared_accept_queue", "healthy"}
    assert "4 processes accept from one listening socket" in even["shared_accept_queue"].text
    assert "633, 610, 591, 590" in even["shared_accept_queue"].text
    assert "shared_accept_queue" not in shared
    assert "shared_accept_queue" not in rules(split(900, 100))
    assert "shared_accept_queue" not in rules(split(633, 610, 591, 590, listeners=4))
    assert "shared_accept_queue" not in rules(split(633))                # one process
    assert "shared_accept_queue" in rules(split(3, 2, 2, 2))             # few, still shared
    reuse = next(f for f in diagnose(split(551, 397, 394, 231, listeners=4))
                 if f.rule == "workers_uneven")
    assert "SO_REUSEPORT socket (4 listeners)" in reuse.text
