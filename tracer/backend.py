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


@dataclass
class KernelSnapshot:
    """Cumulative kernel-side aggregates since the programs were loaded."""

    hists: dict[str, Histogram] = field(default_factory=dict)  # stage or queue name -> hist
    counters: dict[str, int] = field(default_factory=dict)
    procs: list[ProcSnapshot] = field(default_factory=list)
    listeners: list[ListenerSnapshot] = field(default_factory=list)


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


class Backend(Protocol):
    name: str
    hooks: list[str]
    notes: list[str]
    ack_overflow_observable: bool
    dispatch: bool
    exact_drops: bool           # drop counters taken at the kernel's decision points
    missing_stages: set[str]    # stages this kernel's hooks cannot measure (null)

    def snapshot(self) -> KernelSnapshot: ...

    def poll(self, timeout_ms: int) -> list[ConnRecord]: ...

    def set_sample_threshold(self, total_ns: int) -> None: ...

    def attach_dispatch(self, target: DispatchTarget) -> None: ...

    def set_server_pids(self, pids: list[int]) -> None: ...

    def close(self) -> None: ...
