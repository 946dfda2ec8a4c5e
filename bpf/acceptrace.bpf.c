// SPDX-License-Identifier: Apache-2.0
/*
 * acceptrace.bpf.c -- the accept path of one TCP port, from the SYN to the
 * first ASGI dispatch.  One program, three sets of hooks (libbpf-tools
 * style), chosen by exactly one of:
 *
 *   -DAT_BACKEND_FENTRY      fentry/fexit (BPF trampolines) on the kernel
 *                            functions of the accept path
 *   -DAT_BACKEND_KPROBE      the same functions with kprobes/kretprobes
 *   -DAT_BACKEND_TRACEPOINT  tracepoints only (Linux 6.3+), for kernels
 *                            where neither of the above may be loaded
 *
 * Per connection, keyed by the child struct sock * in a bounded LRU map:
 *
 *              fentry / kprobe                   tracepoint
 *   syn        tcp_conn_request entry, the       tcp_request_sock.snt_synack of
 *              first SYN of the 4-tuple (kept    the accept-queue tail when
 *              by 4-tuple until a child          sock:sk_data_ready fires on the
 *              exists: syncookies included)      listener (0 for syncookies)
 *   queued     inet_csk_complete_hashdance and   that sk_data_ready event
 *              inet_csk_reqsk_queue_add exits
 *   accepted   inet_csk_accept exit (its         syscalls:sys_exit_accept{,4}:
 *              return value: any signature)      fd -> file -> socket -> sk
 *   first_read sock:sock_recv_length (6.3+),      sock:sock_recv_length, ret > 0
 *              else tcp_recvmsg exit; ret > 0
 *   response   sock:sock_send_length (6.3+),      sock:sock_send_length, ret > 0
 *              else tcp_sendmsg exit; ret > 0
 *
 * fentry/kprobe also count each drop at its decision point (AT_C_SYN_DROPPED_*,
 * AT_C_SYNCOOKIES_SENT, AT_C_ACK_OVERFLOW, AT_C_LISTEN_DROPS_OTHER: together
 * every tcp_listendrop() of the port, so they add up to the kernel's
 * TcpExtListenDrops) and, per connection, the client's SYN retransmits.
 *
 * With -DAT_DISPATCH (a uvicorn/httptools server), also:
 *   dispatch   a uprobe on httptools' cb_on_headers_complete, which runs on
 *              the event-loop thread right after that thread read the
 *              request: the socket is the one this thread read last
 *              (recorded per thread at each read), and only the server's
 *              processes (server_pids, kept by userspace) count
 *
 * Histograms and counters are aggregated here, per CPU; userspace only reads
 * them once an interval.  A connection is sent to userspace through the ring
 * buffer only when it is slower than the current threshold (the fastest of
 * the slowest-N that userspace keeps), so the userspace cost does not grow
 * with the connection rate.
 *
 * Nothing here comes from kernel headers: every struct offset and enum value
 * is a -D define computed from the running kernel's BTF (tracer/kernel.py),
 * and so is the presence of each optional hook (AT_HAVE_*).  Kernel functions
 * are read through their arguments by position only where that position is
 * stable; return values always come from bpf_get_func_ret() (fexit) or the
 * return register (kretprobe), whatever the number of arguments.
 */
#if defined(AT_BACKEND_KPROBE) || defined(AT_KPROBE_SYN_RECV)
/* struct pt_regs: the architecture's register ABI (PT_REGS_PARMn/RC), not a
 * kernel-internal layout. */
#include <uapi/linux/ptrace.h>
#endif
#include "acceptrace.h"

#ifndef AT_PORT
#error "AT_PORT must be defined (the listening port to trace)"
#endif
#if defined(AT_BACKEND_FENTRY) + defined(AT_BACKEND_KPROBE) + defined(AT_BACKEND_TRACEPOINT) != 1
#error "define exactly one of AT_BACKEND_FENTRY, AT_BACKEND_KPROBE, AT_BACKEND_TRACEPOINT"
#endif
#if defined(AT_BACKEND_FENTRY) || defined(AT_BACKEND_KPROBE)
#define AT_FUNCS 1 /* the kernel-function hooks */
#if !defined(AT_OFF_SKB_HEAD) || !defined(AT_OFF_SKB_NETWORK_HEADER) || \
    !defined(AT_OFF_SKB_TRANSPORT_HEADER) || !defined(AT_OFF_SK_NET) || \
    !defined(AT_OFF_NET_SYNCOOKIES)
#error "a BTF-derived offset the function hooks need is missing from the cflags"
#endif
#endif
/* A SYN of the same 4-tuple within this window is a retransmit of the first
 * (tcp_syn_retries=6 gives up after 127 s). */
#ifndef AT_SYN_WINDOW_NS
#define AT_SYN_WINDOW_NS (130ULL * 1000000000ULL)
#endif
#ifndef AT_CONN_MAX
#define AT_CONN_MAX 65536
#endif
#ifndef AT_RINGBUF_PAGES
#define AT_RINGBUF_PAGES 64
#endif

#if !defined(AT_OFF_SK_STATE) || !defined(AT_OFF_SK_NUM) || !defined(AT_OFF_SK_FAMILY) || \
    !defined(AT_OFF_SK_DPORT) || !defined(AT_OFF_SK_DADDR) || !defined(AT_OFF_SK_RCV_SADDR) || \
    !defined(AT_OFF_SK_ACK_BACKLOG) || !defined(AT_OFF_SK_MAX_ACK_BACKLOG) || \
    !defined(AT_OFF_ICSK_ACCEPTQ_TAIL) || !defined(AT_OFF_ICSK_ACCEPTQ_QLEN) || \
    !defined(AT_OFF_REQ_SK) || !defined(AT_OFF_REQ_NUM_RETRANS) || \
    !defined(AT_OFF_TREQ_SNT_SYNACK) || !defined(AT_OFF_TASK_FILES) || \
    !defined(AT_OFF_FILES_FDT) || !defined(AT_OFF_FDT_FD) || !defined(AT_OFF_FDT_MAX_FDS) || \
    !defined(AT_OFF_FILE_PRIVATE_DATA) || !defined(AT_OFF_SOCKET_SK) || \
    !defined(AT_TCP_LISTEN) || !defined(AT_TCP_ESTABLISHED) || !defined(AT_TCP_SYN_RECV) || \
    !defined(AT_TCP_CLOSE)
#error "a BTF-derived offset or enum value is missing from the cflags"
#endif

#define AT_AF_INET 2
#define AT_AF_INET6 10
#define AT_IPPROTO_TCP 6

#if defined(AT_BACKEND_TRACEPOINT) && defined(AT_HAVE_KFREE_SKB_REASON)
/* The kfree_skb tracepoint's struct, generated by BCC from tracefs, names
 * this enum; a complete declaration is all it needs (the values are BTF's). */
enum skb_drop_reason { AT_SKB_DROP_REASON_PLACEHOLDER = 0 };
#endif

BPF_TABLE("lru_hash", u64, struct at_conn, conns, AT_CONN_MAX);
BPF_TABLE("lru_hash", u64, struct at_listener, listeners, 256);
BPF_TABLE("lru_hash", u32, struct at_proc, procs, 4096);
BPF_PERCPU_ARRAY(hists, struct at_hist, AT_H_COUNT);
BPF_PERCPU_ARRAY(counters, u64, AT_C_COUNT);
/* [0]: a connection is sampled when its total (ns) is >= this; set by userspace. */
BPF_ARRAY(sample_min, u64, 1);
BPF_RINGBUF_OUTPUT(samples, AT_RINGBUF_PAGES);
#ifdef AT_DISPATCH
/* thread id -> the socket of the port it read last */
BPF_TABLE("lru_hash", u32, u64, last_read, 16384);
/* tgids of the processes serving the port (userspace keeps it current) */
BPF_HASH(server_pids, u32, u8, 4096);
#endif

#ifdef AT_FUNCS
/* The SYNs of a 4-tuple, from its first SYN until the child exists.  Bounded:
 * a SYN that never completes is evicted, never leaked. */
BPF_TABLE("lru_hash", struct at_tuple, struct at_syn, syns, AT_CONN_MAX);

/* What tcp_conn_request on this CPU is deciding (softirq: no nesting per CPU). */
struct at_synctx {
	u64 lsk;          /* the listener, 0: no SYN of ours in progress */
	u64 now;
	struct at_tuple t;
	u8 synq_full;     /* inet_csk_reqsk_queue_is_full() at entry */
	u8 synq_at_limit; /* qlen >= max: full by the older kernels' test */
	u8 acceptq_full;  /* sk_acceptq_is_full() at entry */
	u8 syncookies;    /* net.ipv4.tcp_syncookies of the listener's namespace */
	u8 outcome;       /* AT_OUT_* seen before the exit */
	u8 pad[3];
};
#define AT_OUT_COOKIE 1   /* cookie_v{4,6}_init_sequence: a syncookie was sent */
#define AT_OUT_HASHED 2   /* inet_csk_reqsk_queue_hash_add: the request is in the SYN queue */
#define AT_OUT_CHILD 4    /* a child was queued at once (TCP Fast Open) */
BPF_PERCPU_ARRAY(synctx, struct at_synctx, 1);

/* tcp_v{4,6}_syn_recv_sock on this CPU: [0] v4, [1] v6 (v6 calls v4 for a
 * v4-mapped peer).  What its exit needs of the entry. */
struct at_rsctx {
	u64 lsk;
	u64 skb;
	u8 acceptq_full;
	u8 pad[7];
};
BPF_PERCPU_ARRAY(rsctx, struct at_rsctx, 2);

/* The child inet_csk_reqsk_queue_add() last queued on this CPU (see on_queue_done). */
struct at_qmark {
	u64 child;
	u64 ns;
};
BPF_PERCPU_ARRAY(qmark, struct at_qmark, 1);
#endif

#define READ_KERN(dst, ptr) bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)(ptr))

static __always_inline void count(u32 id)
{
	u64 *c = counters.lookup(&id);
	if (c)
		(*c)++;
}

static __always_inline void hist_add(u32 id, u64 raw, u64 scale)
{
	struct at_hist *h = hists.lookup(&id);
	u32 b;

	if (!h)
		return;
	b = at_hist_bucket(raw / scale);
	/* Hide b's provenance so the bounds check below is kept for the verifier. */
	asm volatile("" : "+r"(b));
	if (b >= AT_HIST_NBUCKETS)
		return;
	h->buckets[b]++;
	if (h->count == 0 || raw < h->min)
		h->min = raw;
	if (raw > h->max)
		h->max = raw;
	h->count++;
	h->sum += raw;
}

/* A TCP socket of the traced port, in the expected state (-1: any state). */
static __always_inline int sk_is_ours(const void *sk, int state)
{
	u16 num = 0, family = 0;
	u8 st = 0;

	READ_KERN(num, sk + AT_OFF_SK_NUM);
	if (num != AT_PORT)
		return 0;
	READ_KERN(family, sk + AT_OFF_SK_FAMILY);
	if (family != AT_AF_INET && family != AT_AF_INET6)
		return 0;
#ifdef AT_OFF_SK_PROTOCOL
	{
		u16 proto = 0;
		READ_KERN(proto, sk + AT_OFF_SK_PROTOCOL);
		if (proto != AT_IPPROTO_TCP)
			return 0;
	}
#endif
	if (state >= 0) {
		READ_KERN(st, sk + AT_OFF_SK_STATE);
		if (st != state)
			return 0;
	}
	return 1;
}

/* Cheapest test that a socket is not ours: its local port (2-byte read).
 * The read/send hooks fire for every socket on the machine. */
static __always_inline int sk_port_is_ours(const void *sk)
{
	u16 num = 0;

	READ_KERN(num, sk + AT_OFF_SK_NUM);
	return num == AT_PORT;
}

/* Fill the 4-tuple of a child socket from its sock_common. */
static __always_inline void conn_tuple_from_sk(struct at_conn *c, const void *sk)
{
	u16 family = 0, dport_be = 0;

	READ_KERN(family, sk + AT_OFF_SK_FAMILY);
	READ_KERN(dport_be, sk + AT_OFF_SK_DPORT);
	c->family = family;
	c->sport = (u16)((dport_be >> 8) | (dport_be << 8)); /* the client's port */
	c->dport = AT_PORT;
	if (family == AT_AF_INET) {
		bpf_probe_read_kernel(c->saddr, 4, sk + AT_OFF_SK_DADDR);
		bpf_probe_read_kernel(c->daddr, 4, sk + AT_OFF_SK_RCV_SADDR);
	}
#if defined(AT_OFF_SK_V6_DADDR) && defined(AT_OFF_SK_V6_RCV_SADDR)
	else {
		bpf_probe_read_kernel(c->saddr, 16, sk + AT_OFF_SK_V6_DADDR);
		bpf_probe_read_kernel(c->daddr, 16, sk + AT_OFF_SK_V6_RCV_SADDR);
	}
#endif
}

/* Send a finished connection to userspace if it is among the slowest. */
static __always_inline void maybe_sample(struct at_conn *c, u64 reason)
{
	u32 zero = 0;
	u64 *min = sample_min.lookup(&zero);
	u64 start = c->syn_ns ? c->syn_ns : c->queued_ns;
	u64 end = c->response_ns ? c->response_ns :
		  c->dispatch_ns ? c->dispatch_ns :
		  c->first_read_ns ? c->first_read_ns : c->accepted_ns;
	struct at_sample *s;

	if (c->sampled || !start || !end || end < start)
		return;
	if (min && end - start < *min)
		return;
	s = samples.ringbuf_reserve(sizeof(struct at_sample));
	if (!s) {
		count(AT_C_LOST_EVENTS);
		return;
	}
	c->sampled = 1;
	__builtin_memcpy(&s->conn, c, sizeof(*c));
	s->reason = reason;
	samples.ringbuf_submit(s, 0);
}

/* The listener's last depth, for the per-listener view. */
static __always_inline void listener_seen(const void *lsk, u64 now, u32 depth)
{
	u64 key = (u64)lsk;
	u32 max_backlog = 0;
	u16 family = 0;
	struct at_listener *l, lzero = {};

	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
	l = listeners.lookup(&key);
	if (!l) {
		READ_KERN(family, lsk + AT_OFF_SK_FAMILY);
		lzero.family = family;
		lzero.port = AT_PORT;
		listeners.update(&key, &lzero);
		l = listeners.lookup(&key);
	}
	if (l) {
		l->last_ns = now;
		l->max_backlog = max_backlog;
		if (depth > l->max_depth)
			l->max_depth = depth;
	}
}

/* A child was put on the listener's accept queue: the queue depths now. */
static __always_inline void queue_depths(const void *lsk, u64 now)
{
	u32 depth = 0;
	int qlen = 0;

	READ_KERN(depth, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(qlen, lsk + AT_OFF_ICSK_ACCEPTQ_QLEN);
	count(AT_C_QUEUED);
	hist_add(AT_H_ACCEPTQ_DEPTH, depth, 1);
	hist_add(AT_H_SYNQ_DEPTH, qlen > 0 ? (u64)qlen : 0, 1);
	listener_seen(lsk, now, depth);
}

/* accept() returned child `sk` of the port, in the accepting task. */
static __always_inline void on_accepted(const void *sk)
{
	u64 now, key;
	u32 tgid;
	struct at_conn *c, zero = {};
	struct at_proc *p, pzero = {};

	if (!sk || !sk_is_ours(sk, -1))
		return;
	now = bpf_ktime_get_ns();
	tgid = bpf_get_current_pid_tgid() >> 32;
	count(AT_C_ACCEPTED);

	p = procs.lookup(&tgid);
	if (!p) {
		bpf_get_current_comm(pzero.comm, sizeof(pzero.comm));
		procs.update(&tgid, &pzero);
		p = procs.lookup(&tgid);
	}
	if (p)
		__sync_fetch_and_add(&p->accepted, 1);

	key = (u64)sk;
	c = conns.lookup(&key);
	if (!c || !c->queued_ns || c->accepted_ns) {
		/* Queued before we attached, or evicted from the LRU map. */
		count(AT_C_ACCEPT_UNTRACKED);
		zero.accepted_ns = now;
		zero.pid = tgid;
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		conn_tuple_from_sk(&zero, sk);
		conns.update(&key, &zero);
		return;
	}
	c->accepted_ns = now;
	c->pid = tgid;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	if (c->syn_ns == 0 && c->syncookie == 0)
		count(AT_C_QUEUE_MISSED);
	hist_add(AT_H_ACCEPT_QUEUE, now - c->queued_ns, 1000);
	if (c->syn_ns)
		hist_add(AT_H_SYN_TO_ACCEPT, now - c->syn_ns, 1000);
}

/* A read of `ret` bytes from socket `sk` (any socket: the port is checked). */
static __always_inline void on_read(const void *sk, long ret)
{
	u64 key = (u64)sk;
	struct at_conn *c;
	u64 now;

	if (ret <= 0 || !sk || !sk_port_is_ours(sk))
		return;
#ifdef AT_DISPATCH
	{
		u32 tid = (u32)bpf_get_current_pid_tgid();
		last_read.update(&tid, &key);
	}
#endif
	c = conns.lookup(&key);
	if (!c || !c->accepted_ns || c->first_read_ns)
		return;
	now = bpf_ktime_get_ns();
	c->first_read_ns = now;
	count(AT_C_READ);
	hist_add(AT_H_ACCEPT_TO_READ, now - c->accepted_ns, 1000);
#ifndef AT_DISPATCH
	/* Without dispatch tracing the connection's story ends here. */
	if (c->queued_ns)
		maybe_sample(c, AT_SAMPLE_READ);
	conns.delete(&key);
#endif
}

/* The connection closed: send it if it is among the slowest, and forget it. */
static __always_inline void on_close(const void *sk)
{
	u64 key = (u64)sk;
	struct at_conn *c = conns.lookup(&key);

	if (c && c->accepted_ns) {
		maybe_sample(c, AT_SAMPLE_CLOSE);
		conns.delete(&key);
	}
}

#ifdef AT_DISPATCH
/*
 * uprobe: httptools' cb_on_headers_complete (or llhttp_execute when the
 * library is stripped): uvicorn builds the ASGI scope and schedules the app.
 */
int on_dispatch(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	u64 *skp, key, now;
	struct at_conn *c;

	if (!server_pids.lookup(&tgid))
		return 0;
	skp = last_read.lookup(&tid);
	if (!skp)
		return 0;
	key = *skp;
	c = conns.lookup(&key);
	if (!c || !c->accepted_ns)
		return 0;
	count(AT_C_REQUESTS);
	c->requests++;
	if (c->dispatch_ns)
		return 0; /* keep-alive or pipelined: the stage is the first dispatch */
	now = bpf_ktime_get_ns();
	c->dispatch_ns = now;
	count(AT_C_DISPATCHED);
	hist_add(AT_H_ACCEPT_TO_DISPATCH, now - c->accepted_ns, 1000);
	if (c->first_read_ns && now >= c->first_read_ns)
		hist_add(AT_H_READ_TO_DISPATCH, now - c->first_read_ns, 1000);
	if (c->syn_ns)
		hist_add(AT_H_SYN_TO_DISPATCH, now - c->syn_ns, 1000);
	return 0;
}

/* A write of `ret` bytes to socket `sk`: the first bytes the server writes back. */
static __always_inline void on_send(const void *sk, long ret)
{
	u64 key = (u64)sk;
	struct at_conn *c;
	u64 now;

	if (ret <= 0 || !sk || !sk_port_is_ours(sk))
		return;
	c = conns.lookup(&key);
	if (!c || !c->dispatch_ns || c->response_ns)
		return;
	now = bpf_ktime_get_ns();
	c->response_ns = now;
	count(AT_C_RESPONDED);
	hist_add(AT_H_DISPATCH_TO_RESPONSE, now - c->dispatch_ns, 1000);
	if (c->queued_ns)
		maybe_sample(c, AT_SAMPLE_RESPONSE);
}
#endif

#if defined(AT_KSYM_PER_CPU_OFFSET) && defined(AT_KSYM_BPF_PROG_ACTIVE) && \
    defined(AT_NET_RX_SOFTIRQ) && defined(AT_TIMER_SOFTIRQ)
/*
 * Blind spots.  The kernel runs a kprobe or (perf) tracepoint program only if
 * no other such program is running on the CPU (bpf_prog_active, also held by
 * BPF map syscalls and, on older kernels, uprobe programs), and a kprobe only
 * if no kprobe handler is (current_kprobe).  When a network or timer softirq
 * starts on top of such a program -- an interrupt landed in acceptrace's own
 * process-context hooks (accept, reads, state changes) or another tool's --
 * every kprobe and tracepoint program in that softirq is skipped, silently
 * before Linux 6.7: SYNs, drops and queue inserts not seen.
 * Count those softirqs, so a report can say its counts may be short.
 * fentry programs and this raw tracepoint are not affected (per-program
 * recursion checks only).  Per-CPU addresses: the variable's address plus
 * __per_cpu_offset[cpu], both from /proc/kallsyms.
 */
#if defined(AT_BACKEND_KPROBE) || defined(AT_KPROBE_SYN_RECV)
/* Drop counters come from kprobes: also count the port's packets in blind
 * softirqs (netif_receive_skb below), the most those counters can be short. */
#define AT_COUNT_UNSEEN 1
/* 1 while this CPU runs a NET_RX softirq that began busy. */
BPF_PERCPU_ARRAY(blind, u32, 1);
#endif

RAW_TRACEPOINT_PROBE(softirq_entry)
{
	u32 vec = (u32)ctx->args[0], zero = 0, busy;
	u64 off = 0;
	int active = 0;
	u64 kp = 0;

	if (vec != AT_NET_RX_SOFTIRQ && vec != AT_TIMER_SOFTIRQ)
		return 0;
	if (bpf_probe_read_kernel(&off, sizeof(off),
				  (void *)(AT_KSYM_PER_CPU_OFFSET + 8ULL * bpf_get_smp_processor_id())))
		return 0;
	bpf_probe_read_kernel(&active, sizeof(active), (void *)(AT_KSYM_BPF_PROG_ACTIVE + off));
#ifdef AT_KSYM_CURRENT_KPROBE
	bpf_probe_read_kernel(&kp, sizeof(kp), (void *)(AT_KSYM_CURRENT_KPROBE + off));
#endif
	busy = active > 0 || kp;
	if (busy)
		count(AT_C_SOFTIRQ_BUSY);
#ifdef AT_COUNT_UNSEEN
	if (vec == AT_NET_RX_SOFTIRQ) {
		u32 *f = blind.lookup(&zero);
		if (f)
			*f = busy;
	}
#endif
	return 0;
}

#ifdef AT_COUNT_UNSEEN
RAW_TRACEPOINT_PROBE(softirq_exit)
{
	u32 zero = 0, *f;

	if ((u32)ctx->args[0] != AT_NET_RX_SOFTIRQ)
		return 0;
	f = blind.lookup(&zero);
	if (f)
		*f = 0;
	return 0;
}
#endif
#endif /* the busy-softirq counter */

/* A SYN-ACK retransmitted by a listener of the port (skaddr = listener). */
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
	if (args->sport != AT_PORT)
		return 0;
	count(AT_C_SYNACK_RETRANS);
	return 0;
}

#if defined(AT_BACKEND_TRACEPOINT) || defined(AT_READ_TRACEPOINTS)
/*
 * Reads and writes, where the kernel has these tracepoints (6.3+): every
 * backend prefers them to tcp_recvmsg/tcp_sendmsg hooks -- no kretprobe, no
 * per-thread stash, the socket and the byte count in one event.
 */
/* sock_recvmsg() of any socket: the first one with bytes after accept(). */
TRACEPOINT_PROBE(sock, sock_recv_length)
{
	if (args->protocol != AT_IPPROTO_TCP)
		return 0;
	on_read(args->sk, args->ret);
	return 0;
}

#ifdef AT_DISPATCH
/* sock_sendmsg() of any socket. */
TRACEPOINT_PROBE(sock, sock_send_length)
{
	if (args->protocol != AT_IPPROTO_TCP)
		return 0;
	on_send(args->sk, args->ret);
	return 0;
}
#endif
#endif

/* ======================================================================
 * Tracepoint backend
 * ====================================================================== */
#ifdef AT_BACKEND_TRACEPOINT
/*
 * A child was queued on a listener: sock_def_readable() on the listener,
 * called by tcp_child_process() (and the fastopen path) right after
 * inet_csk_reqsk_queue_add() put it at the accept-queue tail.
 */
TRACEPOINT_PROBE(sock, sk_data_ready)
{
	const void *lsk = args->skaddr;
	const void *req = NULL, *child = NULL;
	u64 now, key, snt_us = 0;
	u8 retrans = 0;
	struct at_conn *c, zero = {};

	if (args->protocol != AT_IPPROTO_TCP)
		return 0;
	if (!sk_is_ours(lsk, AT_TCP_LISTEN))
		return 0;
	now = bpf_ktime_get_ns();
	queue_depths(lsk, now);

	READ_KERN(req, lsk + AT_OFF_ICSK_ACCEPTQ_TAIL);
	if (!req)
		return 0;
	READ_KERN(child, req + AT_OFF_REQ_SK);
	if (!child)
		return 0;
	READ_KERN(snt_us, req + AT_OFF_TREQ_SNT_SYNACK);
	READ_KERN(retrans, req + AT_OFF_REQ_NUM_RETRANS);

	key = (u64)child;
	c = conns.lookup(&key);
	if (!c) {
		conns.update(&key, &zero);
		c = conns.lookup(&key);
		if (!c)
			return 0;
	}
	if (c->accepted_ns) {
		if (c->queued_ns)
			return 0; /* the tail is stale: this child was accepted already */
		/* Accepted on another CPU between the enqueue and this event (an
		 * accept loop): it waited no time in the queue. */
		count(AT_C_ACCEPT_EARLY);
		now = c->accepted_ns;
		hist_add(AT_H_ACCEPT_QUEUE, 0, 1000);
		if (snt_us && snt_us * 1000 <= now)
			hist_add(AT_H_SYN_TO_ACCEPT, now - snt_us * 1000, 1000);
	}
	conn_tuple_from_sk(c, child);
	c->queued_ns = now;
	c->synack_retrans = retrans;
	if (snt_us && snt_us * 1000 <= now) {
		c->syn_ns = snt_us * 1000;
		c->syn_ok_ns = c->syn_ns;
		c->syncookie = 0;
		count(AT_C_SYN_TIMED);
		hist_add(AT_H_HANDSHAKE, now - c->syn_ns, 1000);
	} else if (!snt_us) {
		c->syn_ns = 0;
		c->syncookie = 1;
		count(AT_C_SYNCOOKIE);
	}
	return 0;
}

/*
 * SYN_RECV -> ESTABLISHED of a child of the port.  Only a safety net: when
 * two children are queued at once on two CPUs, both sk_data_ready events may
 * see the same tail; the other child is then known from here, with this
 * moment (microseconds before the enqueue) as its queue time.
 */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	const void *sk = args->skaddr;
	u64 key = (u64)sk;
	struct at_conn *c, zero = {};

	/* Our connections are the server side: local port == AT_PORT. */
	if (args->protocol != AT_IPPROTO_TCP || args->sport != AT_PORT)
		return 0;
	if (args->newstate == AT_TCP_CLOSE) {
		on_close(sk);
		return 0;
	}
	if (args->oldstate != AT_TCP_SYN_RECV || args->newstate != AT_TCP_ESTABLISHED)
		return 0;
	c = conns.lookup(&key);
	if (c)
		return 0;
	zero.queued_ns = bpf_ktime_get_ns();
	zero.syncookie = 0;
	conn_tuple_from_sk(&zero, sk);
	conns.update(&key, &zero);
	return 0;
}

/* accept()/accept4() returned fd `ret`: find its struct sock through the fd table. */
static __always_inline int on_accept_exit(long ret)
{
	struct task_struct *task;
	const void *files = NULL, *fdt = NULL, *file = NULL, *sock = NULL, *sk = NULL;
	const void **fdarr = NULL;
	u32 max_fds = 0;

	if (ret < 0)
		return 0;
	task = (struct task_struct *)bpf_get_current_task();
	READ_KERN(files, (void *)task + AT_OFF_TASK_FILES);
	if (!files)
		return 0;
	READ_KERN(fdt, files + AT_OFF_FILES_FDT);
	if (!fdt)
		return 0;
	READ_KERN(max_fds, fdt + AT_OFF_FDT_MAX_FDS);
	if ((u64)ret >= max_fds)
		return 0;
	READ_KERN(fdarr, fdt + AT_OFF_FDT_FD);
	if (!fdarr)
		return 0;
	READ_KERN(file, &fdarr[ret]);
	if (!file)
		return 0;
	READ_KERN(sock, file + AT_OFF_FILE_PRIVATE_DATA);
	if (!sock)
		return 0;
	READ_KERN(sk, sock + AT_OFF_SOCKET_SK);
	on_accepted(sk);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
	return on_accept_exit(args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
	return on_accept_exit(args->ret);
}

#if defined(AT_HAVE_KFREE_SKB_REASON) && defined(AT_DROP_REASON_LISTEN_OVERFLOW) && \
    defined(AT_HAVE_KFREE_SKB_RX_SK)
/*
 * The final ACK of a handshake found the accept queue full: tcp_check_req()
 * drops it with SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (6.15+), rx_sk being the
 * listener (6.11+).  SYNs dropped for the same reason are only consumed
 * (consume_skb) and never reach this tracepoint.
 */
TRACEPOINT_PROBE(skb, kfree_skb)
{
	if (args->reason != AT_DROP_REASON_LISTEN_OVERFLOW || !args->rx_sk)
		return 0;
	if (!sk_is_ours(args->rx_sk, AT_TCP_LISTEN))
		return 0;
	count(AT_C_ACK_OVERFLOW);
	return 0;
}
#endif
#endif /* AT_BACKEND_TRACEPOINT */

/* ======================================================================
 * Kernel-function hooks (fentry and kprobe backends): the logic, then
 * the two sets of glue at the end.
 * ====================================================================== */
#ifdef AT_FUNCS
/* The 4-tuple of a TCP packet (SYN or final ACK) from its headers. */
/* The IP version (4 or 6; 0 if unknown) of a packet, and where its IP header is. */
static __always_inline u8 skb_ip_version(const void *skb, const u8 **head, u16 *nh)
{
	u8 ver = 0;

	READ_KERN(*head, skb + AT_OFF_SKB_HEAD);
	READ_KERN(*nh, skb + AT_OFF_SKB_NETWORK_HEADER);
	if (!*head || *nh == 0xffff)
		return 0;
	READ_KERN(ver, *head + *nh);
	return ver >> 4;
}

static __always_inline int skb_tuple(const void *skb, struct at_tuple *t)
{
	const u8 *head = NULL;
	u16 nh = 0, th = 0, ports[2] = {};
	u8 ver = skb_ip_version(skb, &head, &nh);

	READ_KERN(th, skb + AT_OFF_SKB_TRANSPORT_HEADER);
	if (th == 0xffff)
		return -1;
	if (ver == 4) {
		bpf_probe_read_kernel(t->saddr, 4, head + nh + 12);
		bpf_probe_read_kernel(t->daddr, 4, head + nh + 16);
	} else if (ver == 6) {
		bpf_probe_read_kernel(t->saddr, 16, head + nh + 8);
		bpf_probe_read_kernel(t->daddr, 16, head + nh + 24);
	} else {
		return -1;
	}
	READ_KERN(ports, head + th);
	t->family = ver;
	t->sport = (u16)((ports[0] >> 8) | (ports[0] << 8));
	t->dport = (u16)((ports[1] >> 8) | (ports[1] << 8));
	return 0;
}

#ifdef AT_COUNT_UNSEEN
/*
 * A packet entering the stack (skb->data at the IP header, network_header set)
 * on a CPU whose NET_RX softirq began busy: if it is TCP to the port, the
 * kprobes that would have seen it (its SYN, its drop, its child) did not run.
 */
RAW_TRACEPOINT_PROBE(netif_receive_skb)
{
	u32 zero = 0, *f = blind.lookup(&zero);
	const void *skb = (const void *)ctx->args[0];
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
	if ((u16)((dport_be >> 8) | (dport_be << 8)) == AT_PORT)
		count(AT_C_PACKETS_UNSEEN);
	return 0;
}
#endif

/* tcp_conn_request() entry: a SYN reached listener `lsk`. */
static __always_inline void on_syn(const void *lsk, const void *skb)
{
	u32 zero = 0, backlog = 0, max_backlog = 0;
	int qlen = 0;
	const void *net = NULL;
	struct at_synctx *x;
	struct at_syn *s, snew = {};

	if (!sk_is_ours(lsk, AT_TCP_LISTEN))
		return;
	x = synctx.lookup(&zero);
	if (!x)
		return;
	__builtin_memset(x, 0, sizeof(*x));
	x->lsk = (u64)lsk;
	x->now = bpf_ktime_get_ns();
	count(AT_C_SYNS);

	/* The two tests tcp_conn_request() makes, as it makes them. */
	READ_KERN(qlen, lsk + AT_OFF_ICSK_ACCEPTQ_QLEN);
	READ_KERN(backlog, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
	/* inet_csk_reqsk_queue_is_full(): qlen > max (6.x; ">=" on older kernels,
	 * whose boundary case on_syn_done() also attributes to the SYN queue). */
	x->synq_full = (u32)qlen > max_backlog;
	x->synq_at_limit = (u32)qlen >= max_backlog;
	x->acceptq_full = backlog > max_backlog;
	READ_KERN(net, lsk + AT_OFF_SK_NET);
	if (net)
		READ_KERN(x->syncookies, net + AT_OFF_NET_SYNCOOKIES);

	if (skb_tuple(skb, &x->t) < 0)
		return;
	s = syns.lookup(&x->t);
	if (s && x->now - s->first_ns < AT_SYN_WINDOW_NS) {
		s->last_ns = x->now;
		s->count++;
		s->cookie = 0;
	} else {
		snew.first_ns = snew.last_ns = x->now;
		snew.count = 1;
		syns.update(&x->t, &snew);
	}
}

/* Something tcp_conn_request() did on this CPU (AT_OUT_*), for listener `lsk`
 * (0: the listener is not known at this hook). */
static __always_inline void syn_outcome(const void *lsk, u8 what)
{
	u32 zero = 0;
	struct at_synctx *x = synctx.lookup(&zero);

	if (x && x->lsk && (!lsk || x->lsk == (u64)lsk))
		x->outcome |= what;
}

/*
 * tcp_conn_request() exit: attribute a dropped SYN to the test that dropped it.
 * The function returns 0 whatever happened; what it did is known from the
 * calls it made meanwhile (a syncookie, a request hashed into the SYN queue, a
 * Fast Open child) -- none of those means tcp_listendrop() ran.
 */
static __always_inline void on_syn_done(const void *lsk)
{
	u32 zero = 0;
	struct at_synctx *x = synctx.lookup(&zero);
	struct at_syn *s;
	int dropped;

	if (!x || !x->lsk || (lsk && x->lsk != (u64)lsk))
		return;
	if (x->outcome & AT_OUT_COOKIE) {
		count(AT_C_SYNCOOKIES_SENT);
		s = syns.lookup(&x->t);
		if (s)
			s->cookie = 1;
	}
#ifdef AT_HAVE_REQSK_HASH_ADD
	dropped = !(x->outcome & (AT_OUT_COOKIE | AT_OUT_HASHED | AT_OUT_CHILD));
#else
	/* No hook on the SYN-queue insert here: judge by the two tests alone. */
	dropped = (x->synq_full && !x->syncookies) || x->acceptq_full;
#endif
	if (dropped) {
		/* Order of the tests in tcp_conn_request(): SYN queue first, where
		 * syncookies (if on) rescue the SYN, then the accept queue. */
		if (x->synq_full && !x->syncookies)
			count(AT_C_SYN_DROPPED_SYNQ);
		else if (x->acceptq_full)
			count(AT_C_SYN_DROPPED_ACCEPTQ);
		else if (x->synq_at_limit && !x->syncookies)
			count(AT_C_SYN_DROPPED_SYNQ);
		else
			count(AT_C_LISTEN_DROPS_OTHER);
	}
	x->lsk = 0;
}

/* tcp_v{4,6}_syn_recv_sock() entry: note what its exit needs.  `v6` picks the slot. */
static __always_inline void on_ack_start(u32 v6, const void *lsk, const void *skb)
{
	u32 backlog = 0, max_backlog = 0;
	struct at_rsctx *r = rsctx.lookup(&v6);

	if (!r)
		return;
	r->lsk = 0;
	if (!sk_is_ours(lsk, AT_TCP_LISTEN))
		return;
	READ_KERN(backlog, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
	r->lsk = (u64)lsk;
	r->skb = (u64)skb;
	r->acceptq_full = backlog > max_backlog;
}

/*
 * tcp_v{4,6}_syn_recv_sock() exit: NULL means the final ACK was dropped with
 * tcp_listendrop(); sk_acceptq_is_full() is the function's first test.  The
 * v6 function handles an IPv4 packet (a v4-mapped peer) by calling the v4 one:
 * each packet is counted by the function of its own IP version.
 */
static __always_inline void on_ack_done(u32 v6, const void *child)
{
	struct at_rsctx *r = rsctx.lookup(&v6);
	const u8 *head = NULL;
	u16 nh = 0;

	if (!r || !r->lsk)
		return;
	r->lsk = 0;
	if (child)
		return; /* the child is followed from the queue insert (on_queue_start) */
	if (skb_ip_version((const void *)r->skb, &head, &nh) != (v6 ? 6 : 4))
		return;
	count(r->acceptq_full ? AT_C_ACK_OVERFLOW : AT_C_LISTEN_DROPS_OTHER);
}

/* The 4-tuple of a child socket, keyed as its SYN was (v4-mapped peers as IPv4). */
static __always_inline void sk_tuple(const void *sk, struct at_tuple *t)
{
	u16 family = 0, dport_be = 0;
	u8 v6d[16] = {};

	READ_KERN(family, sk + AT_OFF_SK_FAMILY);
	READ_KERN(dport_be, sk + AT_OFF_SK_DPORT);
	t->sport = (u16)((dport_be >> 8) | (dport_be << 8));
	t->dport = AT_PORT;
	t->family = 4;
#if defined(AT_OFF_SK_V6_DADDR) && defined(AT_OFF_SK_V6_RCV_SADDR)
	if (family == AT_AF_INET6) {
		bpf_probe_read_kernel(v6d, 16, sk + AT_OFF_SK_V6_DADDR);
		/* ::ffff:a.b.c.d came as an IPv4 packet */
		if (*(u64 *)v6d != 0 || *(u16 *)(v6d + 8) != 0 || *(u16 *)(v6d + 10) != 0xffff) {
			__builtin_memcpy(t->saddr, v6d, 16);
			bpf_probe_read_kernel(t->daddr, 16, sk + AT_OFF_SK_V6_RCV_SADDR);
			t->family = 6;
			return;
		}
	}
#endif
	bpf_probe_read_kernel(t->saddr, 4, sk + AT_OFF_SK_DADDR);
	bpf_probe_read_kernel(t->daddr, 4, sk + AT_OFF_SK_RCV_SADDR);
}

/*
 * inet_csk_complete_hashdance() / inet_csk_reqsk_queue_add() entry: `child` is
 * about to be put on listener `lsk`'s accept queue.  Every child passes here --
 * after a final ACK (the hashdance), a syncookie ACK (tcp_get_cookie_sock) or
 * a Fast Open SYN (both queue_add) -- so this is where a connection starts
 * being followed, with the SYN times kept by its 4-tuple.  It must be the
 * entry: once the child is linked, accept() on another CPU may take it before
 * the exit runs.
 */
static __always_inline void on_queue_start(const void *lsk, const void *req, const void *child)
{
	struct at_tuple t = {};
	struct at_syn *s;
	struct at_conn c = {}, *old;
	u64 key = (u64)child, now;

	if (!child || !sk_is_ours(lsk, AT_TCP_LISTEN))
		return;
	now = bpf_ktime_get_ns();
	old = conns.lookup(&key);
	if (old && !old->accepted_ns && old->queued_ns && now - old->queued_ns < 1000000)
		return; /* queue_add called from the hashdance: the outer entry did it */
	sk_tuple(child, &t);
	c.queued_ns = now;
	c.family = t.family == 6 ? AT_AF_INET6 : AT_AF_INET;
	__builtin_memcpy(c.saddr, t.saddr, 16);
	__builtin_memcpy(c.daddr, t.daddr, 16);
	c.sport = t.sport;
	c.dport = AT_PORT;
	if (req)
		READ_KERN(c.synack_retrans, req + AT_OFF_REQ_NUM_RETRANS);
	s = syns.lookup(&t);
	if (s && now - s->first_ns < AT_SYN_WINDOW_NS) {
		c.syn_ns = s->first_ns;
		c.syn_ok_ns = s->last_ns;
		c.syn_retrans = s->count > 255 ? 255 : (u8)(s->count - 1);
		c.syncookie = s->cookie;
		c.flags = AT_CONN_SYN_SEEN;
		syns.delete(&t);
	}
	conns.update(&key, &c);
}

/*
 * ... and its exit: ret == child when the child is on the queue, NULL when it
 * was refused (the listener stopped listening, or another CPU owned the
 * request).  The hashdance calls queue_add -- inlined on some builds, not on
 * others; when both exits fire, the inner one (queue_add) came first and the
 * outer one skips the same child.
 */
static __always_inline void on_queue_done(const void *lsk, const void *child, const void *ret,
					  int from_add)
{
	struct at_conn *c;
	struct at_qmark *m;
	u64 key = (u64)child, now;
	u32 zero = 0;

	if (!child || !sk_is_ours(lsk, AT_TCP_LISTEN))
		return;
	now = bpf_ktime_get_ns();
	m = qmark.lookup(&zero);
	if (m) {
		if (from_add) {
			m->child = key;
			m->ns = now;
		} else if (m->child == key && now - m->ns < 1000000) {
			m->child = 0;
			return;
		}
	}
	c = conns.lookup(&key);
	if (!ret) {
		if (c && !c->accepted_ns)
			conns.delete(&key);
		return;
	}
	syn_outcome(lsk, AT_OUT_CHILD); /* Fast Open: queued from tcp_conn_request */
	queue_depths(lsk, now);
	if (!c || !(c->flags & AT_CONN_SYN_SEEN))
		return;
	count(AT_C_SYN_TIMED);
	if (c->syn_retrans)
		count(AT_C_SYN_RETRIED);
	if (c->syncookie)
		count(AT_C_SYNCOOKIE);
	if (c->queued_ns >= c->syn_ok_ns)
		hist_add(AT_H_HANDSHAKE, c->queued_ns - c->syn_ok_ns, 1000);
}

/* Close of a child of the port (tracepoint, present since 4.16). */
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != AT_IPPROTO_TCP || args->sport != AT_PORT ||
	    args->newstate != AT_TCP_CLOSE)
		return 0;
	on_close(args->skaddr);
	return 0;
}
#endif /* AT_FUNCS */

/* ---------------------------------------------------------------------
 * fentry/fexit glue.  Every hooked function is in this kernel's BTF (else
 * its AT_HAVE_* is not defined and the hook is not compiled); arguments are
 * declared only up to the last one read, and return values come from
 * bpf_get_func_ret(), so a function that gained an argument (syn_recv_sock:
 * 6 -> 7, tcp_recvmsg: 5 -> 4, inet_csk_accept: 4 -> 2) needs no change.
 * --------------------------------------------------------------------- */
#ifdef AT_BACKEND_FENTRY
static __always_inline u64 func_ret(void *ctx)
{
	u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return ret;
}

KFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk, void *skb)
{
	on_syn(sk, skb);
	return 0;
}

KRETFUNC_PROBE(tcp_conn_request, void *rsk_ops, void *af_ops, void *sk)
{
	on_syn_done(sk);
	return 0;
}

#ifdef AT_HAVE_COOKIE_V4_INIT_SEQUENCE
KFUNC_PROBE(cookie_v4_init_sequence)
{
	syn_outcome(0, AT_OUT_COOKIE);
	return 0;
}
#endif

#ifdef AT_HAVE_COOKIE_V6_INIT_SEQUENCE
KFUNC_PROBE(cookie_v6_init_sequence)
{
	syn_outcome(0, AT_OUT_COOKIE);
	return 0;
}
#endif

#ifdef AT_HAVE_REQSK_HASH_ADD
/* Entry, not exit: being called at all means the SYN was not dropped
 * (its return type went from void to bool in 6.10; nothing here reads it). */
KFUNC_PROBE(inet_csk_reqsk_queue_hash_add, void *sk)
{
	syn_outcome(sk, AT_OUT_HASHED);
	return 0;
}
#endif

#ifdef AT_FENTRY_SYN_RECV
/* Only where BPF trampolines carry all its arguments: 7 since a 2026 stable
 * backport, and x86 trampolines took at most 6 before Linux 6.5.  Userspace
 * tries, and falls back to a kretprobe (AT_KPROBE_SYN_RECV). */
KFUNC_PROBE(tcp_v4_syn_recv_sock, void *sk, void *skb)
{
	on_ack_start(0, sk, skb);
	return 0;
}

KRETFUNC_PROBE(tcp_v4_syn_recv_sock)
{
	on_ack_done(0, (const void *)func_ret(ctx));
	return 0;
}

#ifdef AT_HAVE_TCP_V6_SYN_RECV_SOCK
KFUNC_PROBE(tcp_v6_syn_recv_sock, void *sk, void *skb)
{
	on_ack_start(1, sk, skb);
	return 0;
}

KRETFUNC_PROBE(tcp_v6_syn_recv_sock)
{
	on_ack_done(1, (const void *)func_ret(ctx));
	return 0;
}
#endif
#endif /* AT_FENTRY_SYN_RECV */

KFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child, void *req)
{
	on_queue_start(sk, req, child);
	return 0;
}

KRETFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child)
{
	on_queue_done(sk, child, (const void *)func_ret(ctx), 0);
	return 0;
}

#ifdef AT_HAVE_REQSK_QUEUE_ADD
KFUNC_PROBE(inet_csk_reqsk_queue_add, void *sk, void *req, void *child)
{
	on_queue_start(sk, req, child);
	return 0;
}

KRETFUNC_PROBE(inet_csk_reqsk_queue_add, void *sk, void *req, void *child)
{
	on_queue_done(sk, child, (const void *)func_ret(ctx), 1);
	return 0;
}
#endif

#ifdef AT_HAVE_INET_CSK_ACCEPT
KRETFUNC_PROBE(inet_csk_accept)
{
	on_accepted((const void *)func_ret(ctx));
	return 0;
}
#endif

#if defined(AT_HAVE_TCP_RECVMSG) && !defined(AT_READ_TRACEPOINTS)
KRETFUNC_PROBE(tcp_recvmsg, void *sk)
{
	on_read(sk, (long)func_ret(ctx));
	return 0;
}
#endif

#if defined(AT_DISPATCH) && defined(AT_HAVE_TCP_SENDMSG) && !defined(AT_READ_TRACEPOINTS)
KRETFUNC_PROBE(tcp_sendmsg, void *sk)
{
	on_send(sk, (long)func_ret(ctx));
	return 0;
}
#endif
#endif /* AT_BACKEND_FENTRY */

/* ---------------------------------------------------------------------
 * kprobe/kretprobe glue.  Userspace attaches each function it finds in
 * kallsyms (a missing one is reported, and its stage becomes null).  A
 * kretprobe has only the return register: what it needs of the arguments is
 * kept at entry, per CPU for the softirq paths, per thread for the ones
 * that can sleep.
 * --------------------------------------------------------------------- */
#ifdef AT_BACKEND_KPROBE
BPF_TABLE("lru_hash", u32, u64, recv_sk, 16384);   /* tid -> sk in tcp_recvmsg */
#ifdef AT_DISPATCH
BPF_TABLE("lru_hash", u32, u64, send_sk, 16384);   /* tid -> sk in tcp_sendmsg */
#endif
struct at_qactx {
	u64 lsk;
	u64 child;
};
BPF_PERCPU_ARRAY(qactx, struct at_qactx, 2); /* [0] queue_add, [1] hashdance */

int kp_tcp_conn_request(struct pt_regs *ctx)
{
	on_syn((const void *)PT_REGS_PARM3(ctx), (const void *)PT_REGS_PARM4(ctx));
	return 0;
}

int kr_tcp_conn_request(struct pt_regs *ctx)
{
	on_syn_done(0);
	return 0;
}

int kp_cookie_init_sequence(struct pt_regs *ctx)
{
	syn_outcome(0, AT_OUT_COOKIE);
	return 0;
}

int kp_reqsk_queue_hash_add(struct pt_regs *ctx)
{
	syn_outcome((const void *)PT_REGS_PARM1(ctx), AT_OUT_HASHED);
	return 0;
}

int kp_reqsk_queue_add(struct pt_regs *ctx)
{
	u32 zero = 0;
	struct at_qactx *q = qactx.lookup(&zero);

	on_queue_start((const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx),
		       (const void *)PT_REGS_PARM3(ctx));
	if (q) {
		q->lsk = PT_REGS_PARM1(ctx);
		q->child = PT_REGS_PARM3(ctx);
	}
	return 0;
}

int kr_reqsk_queue_add(struct pt_regs *ctx)
{
	u32 zero = 0;
	struct at_qactx *q = qactx.lookup(&zero);

	if (q && q->lsk) {
		on_queue_done((const void *)q->lsk, (const void *)q->child,
			      (const void *)PT_REGS_RC(ctx), 1);
		q->lsk = 0;
	}
	return 0;
}

/* inet_csk_complete_hashdance(sk, child, req, own_req): softirq, like queue_add,
 * which it may call: its own slot. */
int kp_complete_hashdance(struct pt_regs *ctx)
{
	u32 one = 1;
	struct at_qactx *q = qactx.lookup(&one);

	on_queue_start((const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM3(ctx),
		       (const void *)PT_REGS_PARM2(ctx));
	if (q) {
		q->lsk = PT_REGS_PARM1(ctx);
		q->child = PT_REGS_PARM2(ctx);
	}
	return 0;
}

int kr_complete_hashdance(struct pt_regs *ctx)
{
	u32 one = 1;
	struct at_qactx *q = qactx.lookup(&one);

	if (q && q->lsk) {
		on_queue_done((const void *)q->lsk, (const void *)q->child,
			      (const void *)PT_REGS_RC(ctx), 0);
		q->lsk = 0;
	}
	return 0;
}

int kr_inet_csk_accept(struct pt_regs *ctx)
{
	on_accepted((const void *)PT_REGS_RC(ctx));
	return 0;
}

int kp_tcp_recvmsg(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 v = (u64)sk;

	if (sk && sk_port_is_ours(sk))
		recv_sk.update(&tid, &v);
	return 0;
}

int kr_tcp_recvmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *skp = recv_sk.lookup(&tid);

	if (!skp)
		return 0;
	on_read((const void *)*skp, (long)PT_REGS_RC(ctx));
	recv_sk.delete(&tid);
	return 0;
}

#ifdef AT_DISPATCH
int kp_tcp_sendmsg(struct pt_regs *ctx)
{
	const void *sk = (const void *)PT_REGS_PARM1(ctx);
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 v = (u64)sk;

	if (sk && sk_port_is_ours(sk))
		send_sk.update(&tid, &v);
	return 0;
}

int kr_tcp_sendmsg(struct pt_regs *ctx)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u64 *skp = send_sk.lookup(&tid);

	if (!skp)
		return 0;
	on_send((const void *)*skp, (long)PT_REGS_RC(ctx));
	send_sk.delete(&tid);
	return 0;
}
#endif
#endif /* AT_BACKEND_KPROBE */

#if defined(AT_BACKEND_KPROBE) || defined(AT_KPROBE_SYN_RECV)
/* tcp_v{4,6}_syn_recv_sock with kprobes: the kprobe backend's, and the fentry
 * backend's where trampolines cannot carry its 7 arguments. */
int kp_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{
	on_ack_start(0, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx));
	return 0;
}

int kr_tcp_v4_syn_recv_sock(struct pt_regs *ctx)
{
	on_ack_done(0, (const void *)PT_REGS_RC(ctx));
	return 0;
}

int kp_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{
	on_ack_start(1, (const void *)PT_REGS_PARM1(ctx), (const void *)PT_REGS_PARM2(ctx));
	return 0;
}

int kr_tcp_v6_syn_recv_sock(struct pt_regs *ctx)
{
	on_ack_done(1, (const void *)PT_REGS_RC(ctx));
	return 0;
}
#endif
