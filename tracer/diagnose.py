"""A short diagnosis in words, derived from a run's figures.

Each rule looks at the figures, and when it fires says what happened, what
it means, and what to change -- in the terms of the server that accepts on
the port when it was recognised (its backlog and worker options and their
defaults: servers.SERVER_FACTS, docs/servers.md), in general terms otherwise.
tests/test_diagnose.py covers every rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import ProcessCount, Run
from .servers import SERVER_FACTS, ServerFacts
from .words import fmt_us

# Thresholds (microseconds) above which a stage is worth a sentence.
ACCEPT_QUEUE_SLOW_US = 100_000
ACCEPT_TO_READ_SLOW_US = 50_000
HANDSHAKE_SLOW_US = 200_000
SMALL_BACKLOG = 128


@dataclass
class Finding:
    rule: str
    severity: str  # "critical" | "warning" | "info"
    text: str


def _p(run: Run, stage: str, q: float) -> float | None:
    h = run.stages.get(stage)
    return None if h is None else h.percentile(q)


def _namespace(run: Run) -> str:
    """How the findings name the run's network namespace ("" for acceptrace's own)."""
    name = str((run.meta.netns or {}).get("name") or "")
    return "" if not name or name.startswith("acceptrace's own") else f" of {name}"


def _somaxconn(run: Run) -> str:
    s = run.meta.somaxconn
    return ("net.core.somaxconn" if s is None else
            f"net.core.somaxconn ({s} in the namespace{_namespace(run)})")


def _server(run: Run) -> tuple[ProcessCount, ServerFacts] | None:
    p = run.server()
    facts = SERVER_FACTS.get(p.server or "") if p is not None else None
    return None if p is None or facts is None else (p, facts)


def _server_name(p: ProcessCount) -> str:
    return p.server + (f" (worker class {p.worker_class})" if p.worker_class else "") \
        if p.server else p.comm


def _server_advice(run: Run, p: ProcessCount, f: ServerFacts) -> Finding:
    """The backlog and worker options of the server that accepts on the port."""
    n = len({q.pid for q in run.processes if q.server == p.server})
    backlog = run.queues.backlog
    note = f", {f.backlog_note}" if f.backlog_note else ""
    sync = ""
    if p.server == "gunicorn" and p.worker_class == "sync":
        sync = (" Sync workers serve one request at a time each: more of them, or a "
                "threaded or async worker class (-k gthread, -k uvicorn.workers.UvicornWorker).")
    return Finding(
        "server_options", "info",
        f"the port is served by {_server_name(p)}: its accept queue is set with "
        f"{f.backlog_option} (default {f.backlog_default}{note}"
        + (f"; {backlog} here" if backlog is not None else "")
        + f"), capped by {_somaxconn(run)}; its workers with {f.workers_option} (default "
        f"{f.workers_default}) — {n} process{'es' if n != 1 else ''} accepted here."
        + sync)


def diagnose(run: Run) -> list[Finding]:
    out: list[Finding] = []
    d = run.drops
    backlog = run.queues.backlog
    aq99 = _p(run, "accept_queue", 0.99)
    overflow = d.get("listen_overflow")
    somaxconn = run.meta.somaxconn

    if overflow:
        out.append(Finding(
            "accept_queue_overflow", "critical",
            f"accept queue overflowed {overflow:,} times"
            + (f" (backlog {backlog})" if backlog is not None else "")
            + (f"; p99 accept-queue wait {fmt_us(aq99)}" if aq99 is not None else "")
            + ": the server is not calling accept() fast enough — the event loop is blocked "
            "or there are too few workers. A bigger backlog only buys time; unblock the loop "
            "or add workers."))
    elif aq99 is not None and aq99 >= ACCEPT_QUEUE_SLOW_US:
        out.append(Finding(
            "accept_queue_slow", "warning",
            f"p99 accept-queue wait {fmt_us(aq99)} with no overflow: connections sit queued "
            "before accept() — the event loop is busy (blocking calls in async code, CPU-bound "
            "handlers) or the workers are saturated."))

    syn = d.get("syn_dropped")
    if syn:
        out.append(Finding(
            "syn_dropped", "critical",
            f"{syn:,} SYNs were dropped because the accept queue was full: each of those "
            "clients waited at least 1 s (the SYN retransmit timeout; more on repeats: "
            "1 s each with net.ipv4.tcp_syn_linear_timeouts, else 2 s, 4 s, ...) before "
            "getting in — the latency spikes of whole seconds in client metrics."))

    retried = run.connections.get("syn_retried")
    if retried:
        out.append(Finding(
            "syn_retried", "critical",
            f"{retried:,} connection{'s' if retried != 1 else ''} waited ≥ 1 s because their "
            "first SYN was dropped: the client's SYN retransmit timeout (1 s, then 2 s, "
            "4 s, ...) is the floor of their connect time, before the server saw anything."))

    synq = d.get("syn_dropped_synq_full")
    if synq:
        out.append(Finding(
            "syn_dropped_synq_full", "critical",
            f"{synq:,} SYNs were dropped because the SYN queue was full and syncookies are "
            "off (net.ipv4.tcp_syncookies=0): a SYN flood, or handshakes not completing. "
            "Turn syncookies on (1) or raise the backlog."))

    ack = d.get("ack_dropped")
    if ack:
        out.append(Finding(
            "ack_dropped", "warning",
            f"{ack:,} final ACKs were dropped for a full accept queue: the clients believe "
            "they are connected while the server retransmits its SYN-ACK; their first "
            "request stalls until the queue drains. (net.ipv4.tcp_abort_on_overflow=1 "
            "would reset them instead.)"))

    server = _server(run)
    if overflow and backlog is not None and backlog < SMALL_BACKLOG:
        why = ""
        if somaxconn is not None and backlog == somaxconn:
            why = (f": net.core.somaxconn ({somaxconn}) of the namespace{_namespace(run)} "
                   "caps it — raise it with sysctl there (it is per network namespace)")
        if server is not None:
            p, f = server
            default = (f"{p.server}'s default is {f.backlog_default} ({f.backlog_option}), "
                       f"clamped by {_somaxconn(run)}.")
        else:
            default = (f"it is the backlog the server passes to listen(), clamped by "
                       f"{_somaxconn(run)}.")
        out.append(Finding(
            "small_backlog", "warning", f"the listen backlog is only {backlog}{why}; {default}"))
    if server is not None and (overflow or (aq99 is not None and aq99 >= ACCEPT_QUEUE_SLOW_US)):
        out.append(_server_advice(run, *server))

    cookies = d.get("syncookies")
    if cookies:
        out.append(Finding(
            "syncookies", "warning",
            f"{cookies:,} connections came through syncookies: the SYN queue was full "
            "(a SYN flood, or a listen backlog too small for the SYN rate). Cookie "
            "connections lose TCP options such as window scaling on some kernels."))

    rtx = d.get("synack_retransmits")
    hs99 = _p(run, "handshake", 0.99)
    if rtx and not ack:
        out.append(Finding(
            "synack_retransmits", "warning",
            f"{rtx:,} SYN-ACKs were retransmitted: final ACKs were lost on the way "
            "(network loss) — handshakes took a second or more."))
    elif hs99 is not None and hs99 >= HANDSHAKE_SLOW_US:
        out.append(Finding(
            "handshake_slow", "warning",
            f"p99 handshake {fmt_us(hs99)}: a long round trip or lost packets between "
            "clients and server."))

    ar99 = _p(run, "accept_to_read", 0.99)
    if ar99 is not None and ar99 >= ACCEPT_TO_READ_SLOW_US:
        out.append(Finding(
            "accept_to_read_slow", "warning",
            f"p99 accept() → first read {fmt_us(ar99)}: after accepting, the event loop "
            "took long to get to the new connection — other work (often blocking code) "
            "is holding the loop."))

    procs = [p for p in run.processes if p.accepted > 0]
    if len(procs) >= 2:
        hi, lo = max(p.accepted for p in procs), min(p.accepted for p in procs)
        if lo * 3 < hi:
            out.append(Finding(
                "workers_unbalanced", "info",
                f"accepts are unbalanced across {len(procs)} processes ({hi:,} vs {lo:,}): "
                "with one shared listening socket the first worker to wake takes the "
                "connection; SO_REUSEPORT (one queue per worker) spreads them evenly."))

    if d.get("lost_events"):
        out.append(Finding(
            "lost_events", "info",
            f"{d['lost_events']:,} slow-connection samples were lost (ring buffer full): "
            "the slowest list may miss some; histograms and counts are complete."))

    busy = run.extra.get("softirqs_busy")
    unseen = run.extra.get("packets_unseen")
    if busy:
        out.append(Finding(
            "softirqs_busy", "info",
            f"{busy:,} network/timer softirqs began while their CPU was inside a kprobe "
            "or tracepoint BPF program (acceptrace's own or another tool's)"
            + (f", and {unseen:,} packets to the port arrived in them" if unseen else "")
            + ": the "
            "kernel skips kprobe and tracepoint programs there, so SYNs, drops and "
            "connections in them may be missing from these counts (fentry programs are "
            "not affected). kernel_counters are the kernel's own, exact figures."))

    cost = run.cost
    if cost is not None and cost.missed:
        skipped = [p for p in cost.programs if p.missed]
        out.append(Finding(
            "missed_runs", "warning",
            "the kernel skipped runs of acceptrace's programs (another BPF program was running "
            "on that CPU, or the program itself): "
            + "; ".join(f"{p.missed:,} of {p.hook}"
                        + (f" (feeds {', '.join(p.feeds)})" if p.feeds else "")
                        for p in skipped)
            + ". Each figure fed by such a program may be short by at most that many; "
            "kernel_counters are the kernel's own, exact figures."))

    # The namespace's counter covers every listener in it; this run may trace one.
    ns_over = run.kernel_counters.get("TcpExtListenOverflows")
    if (overflow is not None and ns_over is not None and ns_over > overflow
            and run.meta.netns is not None and not run.meta.all_listeners):
        others = ns_over - overflow
        out.append(Finding(
            "other_listeners_overflow", "info",
            f"the namespace{_namespace(run)} counted {ns_over:,} listen overflows "
            f"(TcpExtListenOverflows), {overflow:,} of them on port {run.meta.port}: the other "
            f"{others:,} belong to other listeners of the namespace — run acceptrace without "
            "--port to see which."))

    accepted = run.connections.get("accepted") or 0
    if accepted == 0 and not overflow:
        out.append(Finding(
            "no_traffic", "info",
            "no connection was accepted on this port during the run: is the port right, "
            "and did traffic arrive?"))
    if not out:
        out.append(Finding(
            "healthy", "info",
            f"no accept-path problem seen: {accepted:,} connections, no overflow, "
            + (f"p99 accept-queue wait {fmt_us(aq99)}." if aq99 is not None else
               "nothing queued for long.")))
    untracked = run.extra.get("accept_untracked")
    if untracked:
        timed = run.stages.get("accept_queue")
        out.append(Finding(
            "accept_untracked", "info",
            f"{untracked:,} accepted connections have no queue time: they were queued before "
            "the run began, or more connections were waiting at once than the per-connection "
            "map holds and the oldest were evicted from it. They are counted in accepted and "
            "read (each once), not in the queue stages"
            + (f" (accept_queue timed {timed.count:,} of {accepted:,})" if timed is not None
               else "") + "."))
    return out
