"""The listener table: one row per traced listener of a run, worst first.

Owns how listeners are ranked and what a row shows (namespace, address:port,
owning processes, backlog, accept-queue depth now/max, overflows/s, SYN-queue
drops/s, accept-queue p99, connections/s).  Pure: it reads a run's sections
(``Run.targets``) and is used by the text summary, the dashboard and the
session (which stores the rank in each section's ``extra.rank``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Run

# How a row's rates are taken: over the last interval ("now", the dashboard), or
# over the whole run (the summary, the JSON).
NOW = "now"
RUN = "run"


@dataclass
class ListenerRow:
    section: Run
    namespace: str
    address: str          # "127.0.0.1:8000", "[::]:8000"; several: the first and "+N"
    processes: str        # "uvicorn (3)": the server (else the program) and how many
    #                       processes accept
    backlog: int | None
    depth_now: int | None
    depth_max: int | None
    overflows_s: float | None   # accept queue full: SYNs and final ACKs dropped
    synq_drops_s: float | None  # SYN queue full, no syncookies (fentry/kprobe)
    aq_p99_us: float | None
    conn_s: float
    listening: bool

    def score(self) -> tuple[float, float, float, float]:
        """Worst first: overflowing, then dropping SYNs, then the slowest queue, then
        the busiest."""
        return (self.overflows_s or 0.0, self.synq_drops_s or 0.0, self.aq_p99_us or 0.0,
                self.conn_s)


def _rate(n: int | None, seconds: float) -> float | None:
    if n is None:
        return None
    return n / seconds if seconds > 0 else 0.0


def namespace_name(section: Run) -> str:
    ns = section.meta.netns or {}
    name = str(ns.get("name") or "")
    return "host" if name.startswith("acceptrace's own") or not name else name


def row(section: Run, window: str = RUN) -> ListenerRow:
    lsts = section.queues.listeners
    if lsts:
        first = lsts[0]
        host = f"[{first.address}]" if first.family == "ipv6" else first.address
        address = f"{host}:{first.port}" + (f" +{len(lsts) - 1}" if len(lsts) > 1 else "")
    else:
        address = f"*:{section.meta.port}"
    progs: dict[str, int] = {}
    for p in section.processes:
        name = p.server if p.server and p.server != "unknown" else p.comm
        progs[name] = progs.get(name, 0) + 1
    processes = ", ".join(f"{c} ({n})" if n > 1 else c for c, n in progs.items()) or "-"
    iv = section.recent
    if window == NOW and iv is not None:
        secs = iv.duration_s
        overflow, synq, conns = iv.listen_overflow, iv.synq_dropped, iv.accepted
        st = iv.stages.get("accept_queue") or {}
        p99 = st.get("p99") if st.get("count") else None
        depth_max = iv.accept_queue_depth_max
    else:
        secs = section.meta.duration_s
        overflow = section.drops.get("listen_overflow")
        synq = section.drops.get("syn_dropped_synq_full")
        conns = section.connections.get("accepted") or 0
        h = section.stages.get("accept_queue")
        p99 = h.percentile(0.99) if h is not None and h.count else None
        depths = [lst.max_depth for lst in lsts if lst.max_depth is not None]
        depth_max = max(depths) if depths else None
    nows = [lst.depth_now for lst in lsts if lst.depth_now is not None]
    return ListenerRow(
        section=section,
        namespace=namespace_name(section),
        address=address,
        processes=processes,
        backlog=section.queues.backlog,
        depth_now=sum(nows) if nows else None,
        depth_max=depth_max,
        overflows_s=_rate(overflow, secs),
        synq_drops_s=_rate(synq, secs),
        aq_p99_us=float(p99) if p99 is not None else None,
        conn_s=_rate(conns, secs) or 0.0,
        listening=bool(section.extra.get("listening", True)),
    )


def table(run: Run, window: str = RUN) -> list[ListenerRow]:
    """The run's listeners, worst first (a gone listener after the listening ones
    with the same score)."""
    rows = [row(s, window) for s in run.targets]
    return sorted(rows, key=lambda r: (tuple(-x for x in r.score()), not r.listening,
                                       r.namespace, r.section.meta.port))
