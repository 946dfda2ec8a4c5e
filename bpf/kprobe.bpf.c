// SPDX-License-Identifier: Apache-2.0
/*
 * kprobe.bpf.c -- the kprobe backend's attach glue: kprobes and kretprobes on
 * the same kernel functions as the fentry backend, each hook one line calling
 * its body in funcs.bpf.h / common.bpf.h.  Userspace attaches the kp_/kr_
 * functions (tracer/bpfloader.py, from the rows of tracer/hooks.py); BCC
 * attaches the TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE ones on load.
 *
 * A kretprobe has only the return register: what an exit needs of the
 * arguments is kept at entry, per CPU for the softirq paths (they do not
 * nest on a CPU), per thread for the calls that sleep (tcp_recvmsg,
 * tcp_sendmsg).
 */
#include "funcs.bpf.h"

/* inet_csk_reqsk_queue_add / inet_csk_complete_hashdance on this CPU (the
 * hashdance may call queue_add: one slot each). */
struct at_qactx {
	u64 lsk;
	u64 child;
};
BPF_PERCPU_ARRAY(qactx, struct at_qactx, 2);
#define AT_QA_ADD 0
#define AT_QA_HASHDANCE 1

static __always_inline int qa_enter(u32 slot, u64 lsk, u64 req, u64 child)
{
	struct at_qactx *q = qactx.lookup(&slot);

	on_queue_start((const void *)lsk, (const void *)req, (const void *)child);
	if (q) {
		q->lsk = lsk;
		q->child = child;
	}
	return 0;
}

static __always_inline int qa_exit(u32 slot, u64 ret)
{
	struct at_qactx *q = qactx.lookup(&slot);

	if (q && q->lsk) {
		on_queue_done((const void *)q->lsk, (const void *)q->child, (const void *)ret,
			      slot == AT_QA_ADD);
		q->lsk = 0;
	}
	return 0;
}

/* Whether tcp_recvmsg / tcp_sendmsg entry should keep `sk` for its exit. */
static __always_inline int stashable(u64 sk)
{
	return sk && port_watched(sk_port((const void *)sk));
}

#if AT_HOOK_TCP_CONN_REQUEST == AT_ATTACH_KPROBE
int kp_tcp_conn_request(struct pt_regs *ctx)
{ on_syn((const void *)PT_REGS_PARM3(ctx), (const void *)PT_REGS_PARM4(ctx)); return 0; }
int kr_tcp_conn_request(struct pt_regs *ctx)
{ on_syn_done(0); return 0; }
#endif

#if AT_HOOK_COOKIE_V4_INIT_SEQUENCE == AT_ATTACH_KPROBE
int kp_cookie_v4_init_sequence(struct pt_regs *ctx)
{ syn_outcome(0, AT_OUT_COOKIE); return 0; }
#endif

#if AT_HOOK_COOKIE_V6_INIT_SEQUENCE == AT_ATTACH_KPROBE
int kp_cookie_v6_init_sequence(struct pt_regs *ctx)
{ syn_outcome(0, AT_OUT_COOKIE); return 0; }
#endif

#if AT_HOOK_INET_CSK_REQSK_QUEUE_HASH_ADD == AT_ATTACH_KPROBE
int kp_inet_csk_reqsk_queue_hash_add(struct pt_regs *ctx)
{ syn_outcome((const void *)PT_REGS_PARM1(ctx), AT_OUT_HASHED); return 0; }
#endif

#if AT_HOOK_TCP_V4_SYN_RECV_SOCK == AT_ATTACH_KPROBE
int kp_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_start(0, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx)); return 0; }
int kr_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_done(0, (const void *)PT_REGS_RC(ctx)); return 0; }
#endif

#if AT_HOOK_TCP_V6_SYN_RECV_SOCK == AT_ATTACH_KPROBE
int kp_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_start(1, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx)); return 0; }
int kr_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{ on_ack_done(1, (const void *)PT_REGS_RC(ctx)); return 0; }
#endif

#if AT_HOOK_INET_CSK_COMPLETE_HASHDANCE == AT_ATTACH_KPROBE
/* inet_csk_complete_hashdance(sk, child, req, own_req) */
int kp_inet_csk_complete_hashdance(struct pt_regs *ctx)
{ return qa_enter(AT_QA_HASHDANCE, PT_REGS_PARM1(ctx), PT_REGS_PARM3(ctx), PT_REGS_PARM2(ctx)); }
int kr_inet_csk_complete_hashdance(struct pt_regs *ctx)
{ return qa_exit(AT_QA_HASHDANCE, PT_REGS_RC(ctx)); }
#endif

#if AT_HOOK_INET_CSK_REQSK_QUEUE_ADD == AT_ATTACH_KPROBE
/* inet_csk_reqsk_queue_add(sk, req, child) */
int kp_inet_csk_reqsk_queue_add(struct pt_regs *ctx)
{ return qa_enter(AT_QA_ADD, PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), PT_REGS_PARM3(ctx)); }
int kr_inet_csk_reqsk_queue_add(struct pt_regs *ctx)
{ return qa_exit(AT_QA_ADD, PT_REGS_RC(ctx)); }
#endif

#if AT_HOOK_INET_CSK_ACCEPT == AT_ATTACH_KPROBE
int kr_inet_csk_accept(struct pt_regs *ctx)
{ on_accepted((const void *)PT_REGS_RC(ctx)); return 0; }
#endif

#if AT_HOOK_TCP_RECVMSG == AT_ATTACH_KPROBE
BPF_TABLE("lru_hash", u32, u64, recv_sk, 16384);
int kp_tcp_recvmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 sk = PT_REGS_PARM1(ctx);

	if (stashable(sk))
		recv_sk.update(&tid, &sk);
	return 0;
}

int kr_tcp_recvmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *skp = recv_sk.lookup(&tid);

	if (skp) {
		on_read((const void *)*skp, (long)PT_REGS_RC(ctx));
		recv_sk.delete(&tid);
	}
	return 0;
}
#endif

#if AT_HOOK_TCP_SENDMSG == AT_ATTACH_KPROBE
BPF_TABLE("lru_hash", u32, u64, send_sk, 16384);
int kp_tcp_sendmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 sk = PT_REGS_PARM1(ctx);

	if (stashable(sk))
		send_sk.update(&tid, &sk);
	return 0;
}

int kr_tcp_sendmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *skp = send_sk.lookup(&tid);

	if (skp) {
		on_send((const void *)*skp, (long)PT_REGS_RC(ctx));
		send_sk.delete(&tid);
	}
	return 0;
}
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
