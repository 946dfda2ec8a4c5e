"""Test helper: hold back the final ACKs of handshakes to one port on `lo`.

An XDP program (generic mode on lo, where every loopback packet arrives)
drops TCP segments to PORT that carry ACK but not SYN while `held` is on.
Clients then believe they are connected while the server keeps their
requests in the SYN queue; when the hold is released, the server's SYN-ACK
retransmit makes the clients ACK again, and if the accept queue has filled
meanwhile, those ACKs hit the listen overflow of tcp_check_req().

Tests only: bcc is imported here because this is a traffic shaper for the
test, not part of acceptrace.
"""

from __future__ import annotations

import ctypes as ct
from types import TracebackType

XDP_SRC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
BPF_ARRAY(held, u32, 1);
int hold_acks(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip;
    struct tcphdr *th;
    u32 *on;
    int zero = 0;

    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
        return XDP_PASS;
    th = (void *)ip + ip->ihl * 4;
    if ((void *)(th + 1) > end || th->dest != htons(HOLD_PORT) || th->syn || !th->ack)
        return XDP_PASS;
    on = held.lookup(&zero);
    return on && *on ? XDP_DROP : XDP_PASS;
}
"""


class HoldAcks:
    def __init__(self, port: int) -> None:
        from acceptrace import headers  # the same header tree acceptrace uses
        from bcc import BPF

        headers.activate(headers.find_header_tree())
        self._BPF = BPF
        self.bpf = BPF(text=XDP_SRC.encode(), cflags=[f"-DHOLD_PORT={int(port)}"])
        fn = self.bpf.load_func(b"hold_acks", BPF.XDP)
        self.bpf.attach_xdp(b"lo", fn, BPF.XDP_FLAGS_SKB_MODE)

    def hold(self, on: bool) -> None:
        self.bpf[b"held"][ct.c_int(0)] = ct.c_uint32(1 if on else 0)

    def close(self) -> None:
        self.bpf.remove_xdp(b"lo", self._BPF.XDP_FLAGS_SKB_MODE)
        self.bpf.cleanup()

    def __enter__(self) -> HoldAcks:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
