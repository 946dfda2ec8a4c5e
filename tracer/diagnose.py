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

# Thresholds (microseconds) above which a stage is worth a sentence, on a real machine.
# diagnose(run, slowness) multiplies them (and LOOP_WAIT_US) by how many times slower the
# machine is: the lab stretches its handlers on a slow one (an emulated VM) by as much
# (lab.stretch_factor), so "slow" means the same share of a handler there.
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


def diagnose(run: Run, slowness: float = 1.0) -> list[Finding]:
    """The findings for ``run``; ``slowness`` (≥ 1) scales the time thresholds."""
    out: list[Finding] = []
    slowness = max(1.0, slowness)
    aq_slow = ACCEPT_QUEUE_SLOW_US * slowness
    ar_slow = ACCEPT_TO_READ_SLOW_US * slowness
    hs_slow = HANDSHAKE_SLOW_US * slowness
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
    elif aq99 is not None and aq99 >= aq_slow:
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
    if server is not None and (overflow or (aq99 is not None and aq99 >= aq_slow)):
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
    elif hs99 is not None and hs99 >= hs_slow:
        out.append(Finding(
            "handshake_slow", "warning",
            f"p99 handshake {fmt_us(hs99)}: a long round trip or lost packets between "
            "clients and server."))

    ar99 = _p(run, "accept_to_read", 0.99)
    if ar99 is not None and ar99 >= ar_slow:
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

    out.extend(lab_rules(run, out, slowness))

    accepted = run.connections.get("accepted") or 0
    if accepted == 0 and not overflow and not any(f.severity == "critical" for f in out):
        out.append(Finding(
            "no_traffic", "info",
            "no connection was accepted on this port during the run: is the port right, "
            "and did traffic arrive?"))
    if all(f.rule in ADVISORY for f in out):
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


# -- Rules the lab's scenarios need (tracer/lab.py, docs/lab.md) ------------------------------
# Each in its own function; lab_rules() gathers them after the rules above.

LOOP_WAIT_US = 10_000     # a median wait this long before accept() or the first read
UNEVEN_RATIO = 1.5        # busiest / least busy process, for an uneven split
UNEVEN_MIN_PER_PROCESS = 50
# Findings about the server's set-up, not a problem seen: beside them a run is still healthy.
ADVISORY = frozenset({"shared_accept_queue"})


def _overflows(run: Run) -> int | None:
    """Listen overflows of this run: its own count, else (a backend that cannot split
    them) the namespace's counter when the run has one."""
    over = run.drops.get("listen_overflow")
    if over is not None:
        return over
    return run.kernel_counters.get("TcpExtListenOverflows")


def rule_backlog_clamped(run: Run) -> Finding | None:
    """The backlog equals the namespace's somaxconn: listen() was very likely clamped --
    said when that queue overflowed, or filled to 90 % of its places (a slower client
    side, e.g. an emulated machine, fills a clamped queue without overflowing it)."""
    backlog, somaxconn, over = run.queues.backlog, run.meta.somaxconn, _overflows(run)
    if backlog is None or somaxconn is None or backlog != somaxconn:
        return None
    depth = run.queues.accept_queue_depth
    peak = int(depth.max) if depth is not None and depth.max is not None else None
    if over:
        outcome = f"it overflowed {over:,} times"
    elif over is not None and peak is not None and backlog and peak >= 0.9 * backlog:
        outcome = (f"it filled to {peak:,} of its {backlog:,} places (no overflow yet: the "
                   "next burst overflows it)")
    else:
        return None
    return Finding(
        "backlog_clamped", "warning",
        f"the accept queue's limit is {backlog}, exactly net.core.somaxconn of the "
        f"namespace{_namespace(run)}: the kernel clamps listen(backlog) to somaxconn without "
        "a word, so the server most likely asked for more (uvicorn and gunicorn ask for "
        "2048) and got "
        f"{somaxconn}; {outcome}. Raise net.core.somaxconn in that "
        "namespace (sysctl -w net.core.somaxconn=4096; a container: docker run --sysctl, a "
        "pod's securityContext.sysctls) — then the server gets the queue it asks for.")


def rule_syn_queue_full(run: Run) -> Finding | None:
    """SYN-queue-full drops a backend cannot count itself: the namespace's counter."""
    if run.drops.get("syn_dropped_synq_full") is not None or run.meta.netns is None \
            or run.meta.all_namespaces:
        return None
    n = run.kernel_counters.get("TcpExtTCPReqQFullDrop")
    if not n:
        return None
    cookies = run.meta.sysctls.get("net.ipv4.tcp_syncookies")
    rtx = run.drops.get("synack_retransmits")
    return Finding(
        "syn_queue_full", "critical",
        f"the namespace{_namespace(run)} dropped {n:,} SYNs because a SYN queue was full "
        "and syncookies were not used (TcpExtTCPReqQFullDrop"
        + (f"; net.ipv4.tcp_syncookies={cookies}" if cookies is not None else "")
        + "): a SYN flood, or handshakes that never complete, hold the queue; every new "
        "client's SYN is dropped, so its connect() times out. Turn syncookies on "
        "(net.ipv4.tcp_syncookies=1, the default): past a full SYN queue the kernel then "
        "answers with a cookie and keeps no state."
        + (f" The {rtx:,} SYN-ACK retransmits are the server resending to the SYNs' "
           "sources, which never answer." if rtx else "")
        + " (This backend cannot tell which listener dropped them: the counter is the "
        "namespace's.)")


def rule_abort_on_overflow(run: Run) -> Finding | None:
    """Resets, not stalls: tcp_abort_on_overflow=1 when final ACKs found the queue full."""
    if run.meta.sysctls.get("net.ipv4.tcp_abort_on_overflow") != 1:
        return None
    ack = run.drops.get("ack_dropped")
    over = _overflows(run)
    if ack == 0 or (ack is None and not over):
        return None
    what = (f"the {ack:,} final ACKs that found the accept queue full were" if ack
            else "final ACKs that found the accept queue full (this backend cannot count "
                 "them apart from the overflows) were")
    return Finding(
        "abort_on_overflow", "critical",
        f"net.ipv4.tcp_abort_on_overflow=1 in the namespace{_namespace(run)}: {what} "
        "answered with RST — those clients had connected and see 'connection reset by "
        "peer' on their first request. The resets are the accept queue overflowing: fix "
        "that (see the overflow above); setting it back to 0 only turns the resets into "
        "stalled handshakes that the kernel retries.")


LOOP_RULES = ("accept_queue_slow", "accept_to_read_slow")  # they name the busy loop too


def rule_event_loop_busy(run: Run, out: list[Finding], slowness: float) -> Finding | None:
    """No overflow, yet half the connections wait for the server: its event loop is busy.
    (A wait in the tail only is accept_queue_slow's or accept_to_read_slow's: when
    either said it, this one stays quiet.)"""
    over = _overflows(run)
    accepted = run.connections.get("accepted") or 0
    if over is None or over > 0 or accepted < 20 or any(f.rule in LOOP_RULES for f in out):
        return None
    aq50, ar50 = _p(run, "accept_queue", 0.5), _p(run, "accept_to_read", 0.5)
    ar99 = _p(run, "accept_to_read", 0.99)
    wait = LOOP_WAIT_US * slowness   # diagnose() made it >= 1
    if max(aq50 or 0, ar50 or 0) < wait:
        return None
    depth = run.queues.accept_queue_depth
    deepest = (f", deepest {depth.max:.0f}" if depth is not None and depth.max is not None
               else "")
    resp99 = _p(run, "dispatch_to_response", 0.99)
    waits = [f"{fmt_us(v)} or more {where}" for v, where in (
        (aq50, "in the accept queue (before accept())"),
        (ar50, "from accept() to their first read")) if v is not None and v >= wait]
    waited = f"half the connections waited {' and '.join(waits)}"
    return Finding(
        "event_loop_busy", "warning",
        "the event loop is busy: the accept queue never overflowed (backlog "
        f"{run.queues.backlog}{deepest}), yet {waited} (accept queue p50 "
        f"{fmt_us(aq50)}, p99 {fmt_us(_p(run, 'accept_queue', 0.99))}; accept() → first read "
        f"p50 {fmt_us(ar50)}, p99 {fmt_us(ar99)}). "
        "The kernel's queues are not the problem: the server gets to "
        "accept() and to reading late because its loop is running other code — a "
        "CPU-bound or blocking handler"
        + (f" (dispatch → response p99 {fmt_us(resp99)})" if resp99 is not None else "")
        + ". Move CPU-bound work off the loop (run_in_executor with a process pool), "
        "make blocking calls async, or add workers.")


def _chi2_critical(df: int) -> float:
    """The chi-square value a fair split exceeds with probability 0.001 (Wilson-Hilferty)."""
    z = 3.09
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def rule_workers_uneven(run: Run, out: list[Finding]) -> Finding | None:
    """An uneven split of accepts over the processes, beyond chance; the herd if shared."""
    counts = sorted((p.accepted for p in run.processes if p.accepted > 0), reverse=True)
    n = len(counts)
    if n < 2 or any(f.rule == "workers_unbalanced" for f in out):
        return None
    total = sum(counts)
    if total < UNEVEN_MIN_PER_PROCESS * n:
        return None
    mean = total / n
    chi2 = sum((c - mean) ** 2 / mean for c in counts)
    if chi2 < _chi2_critical(n - 1) or counts[0] < UNEVEN_RATIO * counts[-1]:
        return None
    shared = len(run.queues.listeners) == 1
    why = ("they share one listening socket (one accept queue): every connection wakes "
           "every worker — the thundering herd — and whichever runs first takes it. "
           "SO_REUSEPORT (gunicorn --reuse-port) gives each worker a socket and a queue of "
           "its own; the kernel spreads connections over them by hash and wakes one worker."
           if shared else
           f"each has its own SO_REUSEPORT socket ({len(run.queues.listeners)} listeners): "
           "the kernel hashes clients' addresses and ports over them, so few distinct "
           "clients, or sockets opened and closed during the run, make the split uneven.")
    return Finding(
        "workers_uneven", "info",
        f"accepts split unevenly over {n} processes: {', '.join(f'{c:,}' for c in counts)} "
        f"(an even split is {mean:,.0f} each; far beyond chance): {why}")


def rule_shared_accept_queue(run: Run, out: list[Finding]) -> Finding | None:
    """Several processes accept from one listening socket, the split as even as chance:
    the herd is there even when the split does not show it (an uneven split is said by
    workers_uneven / workers_unbalanced, which explain the herd themselves)."""
    counts = sorted((p.accepted for p in run.processes if p.accepted > 0), reverse=True)
    if len(counts) < 2 or len(run.queues.listeners) != 1:
        return None
    if any(f.rule in ("workers_uneven", "workers_unbalanced") for f in out):
        return None
    return Finding(
        "shared_accept_queue", "info",
        f"{len(counts)} processes accept from one listening socket (one accept queue; "
        f"accepts {', '.join(f'{c:,}' for c in counts)}): asyncio and uvloop wait for it with "
        "epoll, which wakes every one of them for each connection — the thundering herd — "
        "and the first to run takes it. SO_REUSEPORT (gunicorn --reuse-port) gives each "
        "worker a socket and a queue of its own and wakes one; the price is that a "
        "connection hashed to a busy worker waits even while another is idle.")


def lab_rules(run: Run, out: list[Finding], slowness: float) -> list[Finding]:
    """The rules above that fire, in this order.  With tcp_abort_on_overflow=1 the
    final ACKs dropped were reset, not left to stall: ack_dropped's sentence, which
    says they stall, is then left out of ``out``; so is synack_retransmits' (lost
    final ACKs, network loss) beside syn_queue_full, which says whom they went to."""
    found = [f for f in (rule_backlog_clamped(run), rule_syn_queue_full(run),
                         rule_abort_on_overflow(run), rule_event_loop_busy(run, out, slowness),
                         rule_workers_uneven(run, out)) if f is not None]
    herd = rule_shared_accept_queue(run, out + found)
    found += [herd] if herd is not None else []
    if any(f.rule == "abort_on_overflow" for f in found):
        out[:] = [f for f in out if f.rule != "ack_dropped"]
    if any(f.rule == "syn_queue_full" for f in found):
        # its sentence says whom the SYN-ACKs went to; "network loss" would mislead
        out[:] = [f for f in out if f.rule != "synack_retransmits"]
    return found
