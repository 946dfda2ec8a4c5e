"""The seam between a tracing backend (kernel side) and the session.

A backend (fentry, kprobe or tracepoint) attaches its programs
and, when asked, returns a cumulative :class:`KernelSnapshot` and the slow
connections it sent since the last poll.  Everything here is pure Python so
the session logic is testable without root; bpfloader.py is the only module
that imports bcc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .bpfstats import ProgStats
from .hist import Histogram
from .servers import DispatchTarget


@dataclass
class ProcSnapshot:
    pid: int
    comm: str
    accepted: int


@dataclass
class ListenerSnapshot:
    key: int            # kernel address of the listening struct sock (an identity only)
    family: int
    port: int
    max_backlog: int
    max_depth: int
    inode: int = 0      # the socket's inode (0: not known), as sock_diag reports it


@dataclass
class TargetSnapshot:
    """One traced listener's (namespace, port) cumulative kernel aggregates: its row
    of the per-target maps (bpf/acceptrace.h, "Per-target rows")."""

    hists: dict[str, Histogram] = field(default_factory=dict)  # stage or queue name -> hist
    counters: dict[str, int] = field(default_factory=dict)
    procs: list[ProcSnapshot] = field(default_factory=list)
    listeners: list[ListenerSnapshot] = field(default_factory=list)


@dataclass
class KernelSnapshot:
    """Cumulative kernel-side aggregates since the programs were loaded."""

    targets: dict[int, TargetSnapshot] = field(default_factory=dict)  # by target slot
    counters: dict[str, int] = field(default_factory=dict)  # the run-wide row

    def target(self, slot: int) -> TargetSnapshot:
        return self.targets.get(slot) or TargetSnapshot()


@dataclass
class ConnRecord:
    """One connection sent by the kernel because it was among the slowest."""

    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    pid: int | None
    comm: str | None
    syncookie: bool
    synack_retransmits: int
    syn_ns: int | None
    queued_ns: int | None
    accepted_ns: int | None
    first_read_ns: int | None
    dispatch_ns: int | None = None
    response_ns: int | None = None
    requests: int = 0
    syn_ok_ns: int | None = None        # the SYN that got through (fentry/kprobe)
    syn_retransmits: int | None = None  # client SYNs before that one; None: not seen
    slot: int = 0                       # the target slot of its listener


class Backend(Protocol):
    """Everything the session, the run loop and doctor use of a loaded backend."""

    name: str
    slots: int                  # how many targets the programs hold (AT_SLOTS)
    hooks: list[str]            # the attach points that really attached (meta.hooks)
    notes: list[str]
    dispatch: bool              # compiled with the dispatch hooks
    dispatch_targets: list[DispatchTarget]  # the uprobes attached so far
    stats_how: str | None       # what turned the kernel's BPF statistics on (Cost.stats)
    stats_why: str | None       # ... or why they are off

    @property
    def exact_drops(self) -> bool:
        """Drop counters taken at the kernel's decision points."""

    @property
    def ack_overflow_observable(self) -> bool:
        """Final-ACK overflows told apart from SYN ones."""

    @property
    def missing_stages(self) -> set[str]:
        """Stages this kernel's hooks cannot measure (null)."""

    @property
    def busy_counted(self) -> bool:
        """The blind-spot counter (extra.softirqs_busy) runs."""

    @property
    def unseen_counted(self) -> bool:
        """... and the traced ports' packets in blind softirqs (extra.packets_unseen)."""

    def misses_counted(self, label: str) -> bool:
        """The kernel counts the runs it skips of the program at this attach point."""

    def time_programs(self, on: bool) -> bool:
        """Turn the kernel's timing of BPF programs on or off; whether our programs are
        timed from now on (True although asked off where another process holds it on)."""

    def program_stats(self) -> dict[str, ProgStats]:
        """Each attached program's run-time statistics (cumulative), by attach point;
        {} when the kernel's statistics are off."""

    def set_targets(self, targets: dict[tuple[int, int], int]) -> None:
        """Trace these (network namespace inode, port) listeners from now on, each
        counted in its target slot (0 .. slots-1)."""

    def snapshot(self) -> KernelSnapshot: ...

    def ack_overflows(self) -> dict[int, int]:
        """Each used target slot's final-ACK overflows so far (the ``ack_overflow``
        counter of ``snapshot``, read alone: one map lookup)."""

    def poll(self, timeout_ms: int) -> list[ConnRecord]: ...

    def in_flight(self) -> list[ConnRecord]:
        """Connections accepted but not sent yet (read once, when the run ends)."""

    def set_sample_threshold(self, slot: int, total_ns: int) -> None:
        """Send only connections of target ``slot`` slower than this from now on."""

    def attach_dispatch(self, target: DispatchTarget) -> None: ...

    def set_server_pids(self, pids: list[int]) -> None: ...

    def close(self) -> None: ...
