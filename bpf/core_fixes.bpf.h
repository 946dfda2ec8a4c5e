/* SPDX-License-Identifier: Apache-2.0 */
/*
 * core_fixes.bpf.h -- one named helper per kernel change that the programs
 * have to live with, each citing the commit that caused it (the way
 * libbpf-tools' core_fixes.bpf.h does).  Whether a kernel has the change is a
 * feature check in tracer/kernel.py (BTF or tracefs, never a version number),
 * passed here as an explicit 0/1 define.
 *
 * Changes handled elsewhere, without code here:
 * - tracepoints that appeared: sock:sk_data_ready (40e0b0908142, 6.3),
 *   sock:sock_{recv,send}_length (6e6eda44b939, 6.3), skb:kfree_skb's
 *   reason (c504e5c2f964, 5.17) and rx_sk (c53795d48ee8, 6.11),
 *   SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (a11a791ca81e, 6.15): each is a hook
 *   row's check in tracer/hooks.py;
 * - functions whose arguments changed: inet_csk_accept (92ef0fd55ac8, 6.10,
 *   struct proto_accept_arg), tcp_recvmsg (ec095263a965, 5.19, no
 *   nonblock), inet_csk_reqsk_queue_hash_add's return type (ff46e3b44219,
 *   6.10, void -> bool): the glue declares arguments only up to the last one
 *   read, by a position that did not move, and return values come from
 *   bpf_get_func_ret() / the return register;
 * - tcp_v{4,6}_syn_recv_sock's seventh argument (a 2026 stable backport) on
 *   x86 trampolines that carry at most six before 473e3150e30a (6.6): the
 *   fentry backend tries, and hooks those two with kprobes instead
 *   (tracer/bpfloader.py, FentryBackend; tracer/selection.py).
 */
#ifndef AT_CORE_FIXES_BPF_H
#define AT_CORE_FIXES_BPF_H

/*
 * sk_protocol is a plain u16 since bf9765145b85 ("sock: Make sk_protocol a
 * 16-bit value", Linux 5.6); before, it was a bitfield that BTF gives no byte
 * offset for.  Without it (AT_HAVE_SK_PROTOCOL 0) the protocol is not checked here: the hooks that use this are TCP-only
 * already, or check the tracepoint's own protocol field.
 */
static __always_inline int sk_protocol_is_tcp(const void *sk)
{
#if AT_HAVE_SK_PROTOCOL
	u16 proto = 0;

	bpf_probe_read_kernel(&proto, sizeof(proto), sk + AT_OFF_SK_PROTOCOL);
	return proto == 6; /* IPPROTO_TCP */
#else
	return 1;
#endif
}

/*
 * inet_csk_reqsk_queue_is_full(): `qlen > sk_max_ack_backlog` since
 * 3479c7549fb1 ("tcp/dccp: allow a connection when sk_max_ack_backlog is
 * zero", 6.13, backported to the stable kernels), so a SYN queue holds
 * backlog + 1 requests; `>=` before.  The
 * comparison is not visible in BTF, so both are computed: `synq_full` is the
 * current kernels' test and `synq_at_limit` the older kernels' one, whose
 * boundary case on_syn_done() also attributes to the SYN queue.
 */
static __always_inline u8 synq_full(u32 qlen, u32 max_backlog)
{
	return qlen > max_backlog;
}

static __always_inline u8 synq_at_limit(u32 qlen, u32 max_backlog)
{
	return qlen >= max_backlog;
}

#endif /* AT_CORE_FIXES_BPF_H */
