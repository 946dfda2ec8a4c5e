"""ctypes mirrors of the structs and ids in bpf/acceptrace.h.

Only what tracer/bpfloader.py reads by hand: the sample it decodes from the
ring buffer, the ids of the maps' slots, and the address helpers. BCC types
the other maps itself from the C. tests/test_layout.py compiles the header with
the C compiler and checks that every size and offset here agrees with it.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress

AF_INET = 2
AF_INET6 = 10

# enum at_hist_id
H_HANDSHAKE = 0
H_ACCEPT_QUEUE = 1
H_SYN_TO_ACCEPT = 2
H_ACCEPT_TO_READ = 3
H_ACCEPTQ_DEPTH = 4
H_SYNQ_DEPTH = 5
H_ACCEPT_TO_DISPATCH = 6
H_READ_TO_DISPATCH = 7
H_SYN_TO_DISPATCH = 8
H_DISPATCH_TO_RESPONSE = 9
H_READ_TO_RESPONSE = 10
H_SYN_TO_RESPONSE = 11
H_COUNT = 12

# enum at_counter_id
C_QUEUED = 0
C_SYN_TIMED = 1
C_SYNCOOKIE = 2
C_ACCEPTED = 3
C_READ = 4
C_SYNACK_RETRANS = 5
C_ACK_OVERFLOW = 6
C_LOST_EVENTS = 7
C_ACCEPT_UNTRACKED = 8
C_QUEUE_MISSED = 9
C_DISPATCHED = 10
C_REQUESTS = 11
C_RESPONDED = 12
C_SYNS = 13
C_SYN_DROPPED_ACCEPTQ = 14
C_SYN_DROPPED_SYNQ = 15
C_SYNCOOKIES_SENT = 16
C_LISTEN_DROPS_OTHER = 17
C_SYN_RETRIED = 18
C_ACCEPT_EARLY = 19
C_SOFTIRQ_BUSY = 20
C_PACKETS_UNSEEN = 21
C_CREATED = 22
C_COUNT = 23

CONN_SYN_SEEN = 1
NO_SLOT = 0xFFFFFFFF


def hist_index(slot: int, hid: int) -> int:
    """Index of histogram ``hid`` of target ``slot`` in the ``hists`` array."""
    return slot * H_COUNT + hid


def counter_index(slot: int, cid: int) -> int:
    """Index of counter ``cid`` of row ``slot`` (``slots``: the run-wide row)."""
    return slot * C_COUNT + cid

SAMPLE_READ = 1
SAMPLE_CLOSE = 2
SAMPLE_RESPONSE = 3


class AtConn(ct.Structure):
    _fields_ = [
        ("syn_ns", ct.c_uint64),
        ("queued_ns", ct.c_uint64),
        ("accepted_ns", ct.c_uint64),
        ("first_read_ns", ct.c_uint64),
        ("dispatch_ns", ct.c_uint64),
        ("response_ns", ct.c_uint64),
        ("syn_ok_ns", ct.c_uint64),
        ("requests", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("slot", ct.c_uint32),
        ("family", ct.c_uint16),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("syncookie", ct.c_uint8),
        ("synack_retrans", ct.c_uint8),
        ("sampled", ct.c_uint8),
        ("syn_retrans", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("comm", ct.c_char * 16),
    ]


class AtSample(ct.Structure):
    _fields_ = [("conn", AtConn), ("reason", ct.c_uint64)]


def format_addr(family: int, raw: bytes) -> str:
    if family == AF_INET6:
        addr = ipaddress.IPv6Address(bytes(raw[:16]))
        return str(addr.ipv4_mapped or addr)
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


def family_name(family: int) -> str:
    return "ipv6" if family == AF_INET6 else "ipv4"
