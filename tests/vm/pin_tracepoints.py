"""Guest helper: two no-op BPF users on the hot tracepoints, for the guest's life.

acceptrace attaches raw tracepoints to irq:softirq_entry, irq:softirq_exit and
net:netif_receive_skb, which every CPU runs all the time, and to the accept
path's own (inet_sock_set_state, sk_data_ready, sock_recv/send_length,
kfree_skb, tcp_retransmit_synack), which run for every packet and socket.  Attaching the first
user of a tracepoint flips its static key, and a change in its number of users
(1 <-> 2) retargets its static call: both live-patch the kernel's text with
int3 (text_poke_bp).  Under QEMU's multi-threaded TCG a vCPU can still run a
stale translation of that code after the patch is done and trap on an int3 the
kernel no longer expects: "Oops: int3" in handle_softirqs (seen once in the
6.12 guest, CPU idle, timer interrupt).  Real CPUs do not do this (BCC's own
softirqs tool attaches there).  With two users held here from boot, acceptrace
attaching and detaching changes neither the key nor the call target, so no
hot code is patched while the tests run.

Prints "ready" once attached; runs until killed (the guest powers off).
"""

from __future__ import annotations

import signal

import bcc

TRACEPOINTS = (b"softirq_entry", b"softirq_exit", b"netif_receive_skb",
               b"inet_sock_set_state", b"kfree_skb", b"tcp_retransmit_synack",
               b"sk_data_ready", b"sock_recv_length", b"sock_send_length")  # last 3: 6.3+
SRC = b"int noop(struct bpf_raw_tracepoint_args *ctx) { return 0; }"


def main() -> None:
    held = []
    missing = set()
    for _ in range(2):  # two users: the static call stays on the iterator
        b = bcc.BPF(text=SRC)
        for tp in TRACEPOINTS:
            if tp in missing:
                continue
            try:
                b.attach_raw_tracepoint(tp=tp, fn_name=b"noop")
            except Exception:  # noqa: BLE001 - not a tracepoint of this kernel
                missing.add(tp)
        held.append(b)
    print("ready" + (f" (not here: {b', '.join(sorted(missing)).decode()})" if missing else ""),
          flush=True)
    signal.pause()


if __name__ == "__main__":
    main()
