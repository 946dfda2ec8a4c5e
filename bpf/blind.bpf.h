/* SPDX-License-Identifier: Apache-2.0 */
/*
 * blind.bpf.h -- counting what the kernel did not let the programs see.
 *
 * The kernel runs a kprobe or (perf) tracepoint program only if no other such
 * program is running on the CPU (bpf_prog_active, also held by BPF map
 * syscalls and, on older kernels, uprobe programs), and a kprobe only if no
 * kprobe handler is (current_kprobe).  When a network or timer softirq starts
 * on top of such a program -- an interrupt landed in acceptrace's own
 * process-context hooks (accept, reads, state changes) or another tool's --
 * every kprobe and tracepoint program in that softirq is skipped, silently
 * before Linux 6.7: SYNs, drops and queue inserts not seen.  Count those
 * softirqs (AT_COUNT_BUSY), so a report can say its counts may be short, and
 * where kprobes feed the drop counters (AT_COUNT_UNSEEN) the traced ports'
 * TCP packets received in them, the most those counters can be short.
 * fentry programs and raw tracepoints are not affected (per-program recursion
 * checks only).  Per-CPU addresses: the variable's address plus
 * __per_cpu_offset[cpu], both from /proc/kallsyms (AT_KSYM_*).
 */
#ifndef AT_BLIND_BPF_H
#define AT_BLIND_BPF_H

#if AT_COUNT_BUSY
#if AT_COUNT_UNSEEN
#include "skb.bpf.h"
/* 1 while this CPU runs a NET_RX softirq that began busy. */
BPF_PERCPU_ARRAY(blind, u32, 1);
#endif

/* softirq_entry (raw tracepoint): vector `vec` begins on this CPU. */
static __always_inline int on_softirq_entry(u32 vec)
{
	u32 zero = 0, busy;
	u64 off = 0, kp = 0;
	int active = 0;

	if (vec != AT_NET_RX_SOFTIRQ && vec != AT_TIMER_SOFTIRQ)
		return 0;
	if (bpf_probe_read_kernel(&off, sizeof(off),
				  (void *)(AT_KSYM_PER_CPU_OFFSET + 8ULL * bpf_get_smp_processor_id())))
		return 0;
	bpf_probe_read_kernel(&active, sizeof(active), (void *)(AT_KSYM_BPF_PROG_ACTIVE + off));
#if AT_HAVE_KSYM_CURRENT_KPROBE
	bpf_probe_read_kernel(&kp, sizeof(kp), (void *)(AT_KSYM_CURRENT_KPROBE + off));
#endif
	busy = active > 0 || kp;
	if (busy)
		count_run(AT_C_SOFTIRQ_BUSY);
#if AT_COUNT_UNSEEN
	if (vec == AT_NET_RX_SOFTIRQ) {
		u32 *f = blind.lookup(&zero);
		if (f)
			*f = busy;
	}
#endif
	return 0;
}

#if AT_COUNT_UNSEEN
/* softirq_exit (raw tracepoint). */
static __always_inline int on_softirq_exit(u32 vec)
{
	u32 zero = 0, *f;

	if (vec != AT_NET_RX_SOFTIRQ)
		return 0;
	f = blind.lookup(&zero);
	if (f)
		*f = 0;
	return 0;
}

/*
 * netif_receive_skb (raw tracepoint): a packet entering the stack (skb->data
 * at the IP header, network_header set) on a CPU whose NET_RX softirq began
 * busy: if it is TCP to a traced port (in any namespace: the bound errs on
 * the safe side), the kprobes that would have seen it (its SYN, its drop, its
 * child) did not run.
 */
static __always_inline int on_netif_receive_skb(const void *skb)
{
	u32 zero = 0, *f = blind.lookup(&zero);
	const u8 *head = NULL;
	u16 nh = 0, dport_be = 0;
	u8 ver, proto = 0, ihl = 0;
	u32 l4 = 0;

	if (!f || !*f)
		return 0;
	ver = skb_ip_version(skb, &head, &nh);
	if (ver == 4) {
		READ_KERN(ihl, head + nh);
		READ_KERN(proto, head + nh + 9);
		l4 = nh + (ihl & 0xf) * 4;
	} else if (ver == 6) {
		READ_KERN(proto, head + nh + 6); /* next header: TCP without extension headers */
		l4 = nh + 40;
	}
	if (proto != 6) /* IPPROTO_TCP, a wire constant */
		return 0;
	READ_KERN(dport_be, head + l4 + 2);
	if (port_watched((u16)((dport_be >> 8) | (dport_be << 8))))
		count_run(AT_C_PACKETS_UNSEEN);
	return 0;
}
#endif /* AT_COUNT_UNSEEN */
#endif /* AT_COUNT_BUSY */

#endif /* AT_BLIND_BPF_H */
