// SPDX-License-Identifier: Apache-2.0
/*
 * fentry.bpf.c -- the fentry backend's attach glue: BPF trampolines on the
 * accept path's kernel functions, each hook one line calling its body in
 * funcs.bpf.h / common.bpf.h.  BCC attaches every KFUNC_PROBE,
 * KRETFUNC_PROBE, TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE compiled in when
 * it loads the program; which are compiled in is decided by
 * tracer/selection.py from the rows of tracer/hooks.py (AT_HOOK_<NAME>).
 *
 * Every hooked function is in this kernel's BTF with at least the arguments
 * declared here (the last one read); return values come from
 * bpf_get_func_ret(), so a function that gained or lost arguments after the
 * ones read needs no change here.
 */
#include "funcs.bpf.h"

static __always_inline u64 func_ret(void *ctx)
{
	u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return ret;
}

#if AT_HOOK_TCP_CONN_REQUEST == AT_ATTACH_FENTRY
KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk, void *skb)
{ on_syn(sk, skb); return 0; }
KRETFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk)
{ on_syn_done(sk); return 0; }
#endif

#if AT_HOOK_COOKIE_V4_INIT_SEQUENCE == AT_ATTACH_FENTRY
KFUNC_PROBE(cookie_v4_init_sequence)
{ syn_outcome(0, AT_OUT_COOKIE); return 0; }
#endif

#if AT_HOOK_COOKIE_V6_INIT_SEQUENCE == AT_ATTACH_FENTRY
KFUNC_PROBE(cookie_v6_init_sequence)
{ syn_outcome(0, AT_OUT_COOKIE); return 0; }
#endif

#if AT_HOOK_INET_CSK_REQSK_QUEUE_HASH_ADD == AT_ATTACH_FENTRY
/* Entry: being called at all means the SYN was not dropped. */
KFUNC_PROBE(inet_csk_reqsk_queue_hash_add, void *sk)
{ syn_outcome(sk, AT_OUT_HASHED); return 0; }
#endif

/* tcp_v{4,6}_syn_recv_sock: with trampolines where they carry all its
 * arguments, else with kprobes (core_fixes.bpf.h: the seventh argument). */
#if AT_HOOK_TCP_V4_SYN_RECV_SOCK == AT_ATTACH_FENTRY
KFUNC_PROBE(tcp_v4_syn_recv_sock, void *sk, void *skb)
{ on_ack_start(0, sk, skb); return 0; }
KRETFUNC_PROBE(tcp_v4_syn_recv_sock)
{ on_ack_done(0, (const void *)func_ret(ctx)); return 0; }
#elif AT_HOOK_TCP_V4_SYN_RECV_SOCK == AT_ATTACH_KPROBE
int kp_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_start(0, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx)); return 0; }
int kr_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_done(0, (const void *)PT_REGS_RC(ctx)); return 0; }
#endif

#if AT_HOOK_TCP_V6_SYN_RECV_SOCK == AT_ATTACH_FENTRY
KFUNC_PROBE(tcp_v6_syn_recv_sock, void *sk, void *skb)
{ on_ack_start(1, sk, skb); return 0; }
KRETFUNC_PROBE(tcp_v6_syn_recv_sock)
{ on_ack_done(1, (const void *)func_ret(ctx)); return 0; }
#elif AT_HOOK_TCP_V6_SYN_RECV_SOCK == AT_ATTACH_KPROBE
int kp_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_start(1, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx)); return 0; }
int kr_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_done(1, (const void *)PT_REGS_RC(ctx)); return 0; }
#endif

#if AT_HOOK_INET_CSK_COMPLETE_HASHDANCE == AT_ATTACH_FENTRY
KFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child, void *req)
{ on_queue_start(sk, req, child); return 0; }
KRETFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child)
{ on_queue_done(sk, child, (const void *)func_ret(ctx), 0); return 0; }
#endif

#if AT_HOOK_INET_CSK_REQSK_QUEUE_ADD == AT_ATTACH_FENTRY
KFUNC_PROBE(inet_csk_reqsk_queue_add, void *sk, void *req, void *child)
{ on_queue_start(sk, req, child); return 0; }
KRETFUNC_PROBE(inet_csk_reqsk_queue_add, void *sk, void *req, void *child)
{ on_queue_done(sk, child, (const void *)func_ret(ctx), 1); return 0; }
#endif

#if AT_HOOK_INET_CSK_ACCEPT == AT_ATTACH_FENTRY
KRETFUNC_PROBE(inet_csk_accept)
{ on_accepted((const void *)func_ret(ctx)); return 0; }
#endif

#if AT_HOOK_TCP_RECVMSG == AT_ATTACH_FENTRY
KRETFUNC_PROBE(tcp_recvmsg, void *sk)
{ on_read(sk, (long)func_ret(ctx)); return 0; }
#endif

#if AT_HOOK_TCP_SENDMSG == AT_ATTACH_FENTRY
KRETFUNC_PROBE(tcp_sendmsg, void *sk)
{ on_send(sk, (long)func_ret(ctx)); return 0; }
#endif

#if AT_HOOK_SOCK_RECV_LENGTH == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(sock_recv_length)
{ on_read((const void *)ctx->args[0], (int)ctx->args[1]); return 0; }
#endif

#if AT_HOOK_SOCK_SEND_LENGTH == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(sock_send_length)
{ on_send((const void *)ctx->args[0], (int)ctx->args[1]); return 0; }
#endif

#if AT_HOOK_INET_SOCK_SET_STATE == AT_ATTACH_RAW_TRACEPOINT
/* A child made, or closed (the queue insert is a function hook). */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{ return on_child_state((const void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]); }
#endif

#if AT_HOOK_TCP_RETRANSMIT_SYNACK == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(tcp_retransmit_synack)
{ on_synack_retransmit((const void *)ctx->args[0]); return 0; }
#endif

#if AT_HOOK_SOFTIRQ_ENTRY == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(softirq_entry)
{ return on_softirq_entry((u32)ctx->args[0]); }
#endif

#if AT_HOOK_SOFTIRQ_EXIT == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(softirq_exit)
{ return on_softirq_exit((u32)ctx->args[0]); }
#endif

#if AT_HOOK_NETIF_RECEIVE_SKB == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(netif_receive_skb)
{ return on_netif_receive_skb((const void *)ctx->args[0]); }
#endif
