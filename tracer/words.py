"""The words and number formats every view shares: what each stage and drop
means, and how microseconds and counts are written.

The terminal report, the dashboard, the HTML page and the diagnosis all take
them from here, so they say the same thing the same way. No imports from the
package: any view may use this module without pulling in another view.
"""

from __future__ import annotations

STAGE_MEANING = {
    "handshake": "SYN → queued (handshake, SYN queue)",
    "accept_queue": "queued → accept() (accept queue)",
    "syn_to_accept": "SYN → accept()",
    "accept_to_read": "accept() → first read",
    "read_to_response": "first read → first byte written back (any server; keep-alive: "
                        "the first request)",
    "syn_to_response": "SYN → first byte written back",
    "accept_to_dispatch": "accept() → ASGI dispatch (headers parsed)",
    "read_to_dispatch": "first read → ASGI dispatch",
    "syn_to_dispatch": "SYN → ASGI dispatch",
    "dispatch_to_response": "ASGI dispatch → first response byte",
}
DROP_MEANING = {
    "listen_overflow": "no room in the accept queue",
    "syn_dropped": "SYN dropped: client waits 1 s, 3 s…",
    "ack_dropped": "final ACK dropped: SYN-ACK resent",
    "synack_retransmits": "SYN-ACK sent again",
    "syncookies": "came via a syncookie",
    "lost_events": "samples lost (ring buffer)",
}
COUNTER_FOR_DROP = {
    "listen_overflow": "TcpExtListenOverflows",
    "syncookies": "TcpExtSyncookiesSent",
}
SHORT_STAGE = {"accept_to_read": "read", "read_to_response": "response"}


def fmt_server(server: str | None, worker_class: str | None = None) -> str:
    """A recognised server as the views name it: "nginx", "gunicorn (sync)"; "-" when
    not known."""
    if not server:
        return "-"
    return f"{server} ({worker_class})" if worker_class else server


def fmt_us(v: float | None) -> str:
    """Microseconds, human-scaled: 840 µs, 12.3 ms, 1.02 s."""
    if v is None:
        return "n/a"
    if v < 1000:
        return f"{v:.0f} µs" if v >= 10 or v == int(v) else f"{v:.1f} µs"
    if v < 1_000_000:
        ms = v / 1000
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{v / 1e6:.2f} s"


def fmt_compact_us(v: float | None) -> str:
    return "n/a" if v is None else fmt_us(v).replace(" ", "")


def fmt_count(v: int | None) -> str:
    return "n/a" if v is None else f"{v:,}"
