/* SPDX-License-Identifier: Apache-2.0 */
/*
 * common.bpf.h -- what every backend shares: the maps, counters and
 * histograms, the filter of traced listeners, and a connection's story from
 * accept() on (accept, first read, ASGI dispatch, first response, close).
 * Each bpf/<backend>.bpf.c includes it and adds only its attach glue.
 *
 * Nothing here comes from kernel headers: every struct offset and enum value
 * is a -D define computed from the running kernel's BTF (tracer/kernel.py),
 * and every choice (which hooks, which counters) is an explicit integer -D
 * define decided once in tracer/selection.py; nothing here derives one
 * define from another.
 */
#ifndef AT_COMMON_BPF_H
#define AT_COMMON_BPF_H

/* struct pt_regs: the architecture's register ABI (uprobe and kprobe
 * arguments), not a kernel-internal layout. */
#include <uapi/linux/ptrace.h>
#include "acceptrace.h"
#include "core_fixes.bpf.h"

#define AT_AF_INET 2
#define AT_AF_INET6 10
#define AT_IPPROTO_TCP 6

BPF_TABLE("lru_hash", u64, struct at_conn, conns, AT_CONN_MAX);
BPF_TABLE("lru_hash", u64, struct at_listener, listeners, 256);
BPF_TABLE("lru_hash", struct at_proc_key, struct at_proc, procs, 4096);
/* One row per target slot (acceptrace.h: "Per-target rows"). */
BPF_PERCPU_ARRAY(hists, struct at_hist, AT_SLOTS * AT_H_COUNT);
BPF_PERCPU_ARRAY(counters, u64, (AT_SLOTS + 1) * AT_C_COUNT);
/* [slot]: a connection of that target is sampled when its total (ns) is >= this
 * (the N-th slowest so far of that target: set by userspace). */
BPF_ARRAY(sample_min, u64, AT_SLOTS);
BPF_RINGBUF_OUTPUT(samples, AT_RINGBUF_PAGES);
/* The traced listeners, (namespace, port) -> target slot, and beside it one flag
 * per port number: an array lookup (inlined by the verifier) that rejects the
 * sockets of every other port before any namespace is read.  Both are filled
 * by userspace (tracer/bpfloader.py set_targets). */
BPF_HASH(targets, struct at_target, u32, 1024);
BPF_ARRAY(watched_ports, u8, 65536);
#if AT_DISPATCH
/* thread id -> the socket of a traced port it read last */
BPF_TABLE("lru_hash", u32, u64, last_read, 16384);
/* tgids of the processes serving the traced ports (userspace keeps it current) */
BPF_HASH(server_pids, u32, u8, 4096);
#endif

#define READ_KERN(dst, ptr) bpf_probe_read_kernel(&(dst), sizeof(dst), (const void *)(ptr))

/* Counter `id` of the listener in target slot `slot`. */
static __always_inline void count(u32 slot, u32 id)
{
	u32 k;
	u64 *c;

	if (slot >= AT_SLOTS)
		return;
	k = slot * AT_C_COUNT + id;
	c = counters.lookup(&k);
	if (c)
		(*c)++;
}

/* A run-wide counter: one that belongs to no single listener. */
static __always_inline void count_run(u32 id)
{
	u32 k = AT_SLOTS * AT_C_COUNT + id;
	u64 *c = counters.lookup(&k);

	if (c)
		(*c)++;
}

static __always_inline void hist_add(u32 slot, u32 id, u64 raw, u64 scale)
{
	struct at_hist *h;
	u32 k, b;

	if (slot >= AT_SLOTS)
		return;
	k = slot * AT_H_COUNT + id;
	h = hists.lookup(&k);
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

/* Is some traced listener on this local port (in any namespace)?  The cheap
 * first test: the read/send hooks fire for every socket on the machine. */
static __always_inline int port_watched(u16 port)
{
	u32 key = port;
	u8 *on = watched_ports.lookup(&key);

	return on && *on;
}

/* A socket's struct net. */
static __always_inline const void *sk_net(const void *sk)
{
	const void *net = NULL;

	READ_KERN(net, sk + AT_OFF_SK_NET);
	return net;
}

/* A namespace's inode number, as in /proc/PID/ns/net. */
static __always_inline u32 net_inum(const void *net)
{
	u32 inum = 0;

	if (net)
		READ_KERN(inum, net + AT_OFF_NET_NS_INUM);
	return inum;
}

/* The network namespace of a socket: its inode number. */
static __always_inline u32 sk_netns(const void *sk)
{
	return net_inum(sk_net(sk));
}

/*
 * The first bytes of struct sock_common: both IPv4 addresses, both ports, the
 * family and the state, in one bpf_probe_read_kernel() where they lie within
 * AT_SKC_HEAD_LEN bytes (always so far; tracer/kernel.py SPANS), else field by
 * field.  A read costs 30-60 ns here, as much as an empty program's whole run
 * (docs/performance.md): the filters read this once.
 */
struct at_skc {
	u8 daddr[4];     /* skc_daddr: the peer's IPv4 address */
	u8 rcv_saddr[4]; /* skc_rcv_saddr: the local IPv4 address */
	u16 dport_be;    /* skc_dport: the peer's port, network order */
	u16 num;         /* skc_num: the local port, host order */
	u16 family;
	u8 state;
};

/* Field `off` (an AT_OFF_ define) of a span read into `buf` from offset `start`
 * (tracer/kernel.py SPANS), copied into `dst`, whose size is the field's. */
#define AT_SPAN_GET(dst, buf, start, off) \
	__builtin_memcpy(&(dst), (buf) + ((off) - (start)), sizeof(dst))

static __always_inline void skc_read(const void *sk, struct at_skc *h)
{
#if AT_SKC_HEAD_LEN
	u8 b[AT_SKC_HEAD_LEN];

	bpf_probe_read_kernel(b, sizeof(b), sk + AT_SKC_HEAD_START); /* zeroed if it fails */
	AT_SPAN_GET(h->daddr, b, AT_SKC_HEAD_START, AT_OFF_SK_DADDR);
	AT_SPAN_GET(h->rcv_saddr, b, AT_SKC_HEAD_START, AT_OFF_SK_RCV_SADDR);
	AT_SPAN_GET(h->dport_be, b, AT_SKC_HEAD_START, AT_OFF_SK_DPORT);
	AT_SPAN_GET(h->num, b, AT_SKC_HEAD_START, AT_OFF_SK_NUM);
	AT_SPAN_GET(h->family, b, AT_SKC_HEAD_START, AT_OFF_SK_FAMILY);
	AT_SPAN_GET(h->state, b, AT_SKC_HEAD_START, AT_OFF_SK_STATE);
#else
	READ_KERN(h->daddr, sk + AT_OFF_SK_DADDR);
	READ_KERN(h->rcv_saddr, sk + AT_OFF_SK_RCV_SADDR);
	READ_KERN(h->dport_be, sk + AT_OFF_SK_DPORT);
	READ_KERN(h->num, sk + AT_OFF_SK_NUM);
	READ_KERN(h->family, sk + AT_OFF_SK_FAMILY);
	READ_KERN(h->state, sk + AT_OFF_SK_STATE);
#endif
}

/* The target slot of a socket on local port `num` whose (namespace, port) is a
 * traced listener's; AT_NO_SLOT for every other socket. */
static __always_inline u32 target_slot(u32 netns, u16 num)
{
	struct at_target t = {};
	u32 *slot;

	t.netns = netns;
	t.port = num;
	slot = targets.lookup(&t);
	return slot ? *slot : AT_NO_SLOT;
}

static __always_inline u32 sk_slot_port(const void *sk, u16 num)
{
	if (!port_watched(num))
		return AT_NO_SLOT;
	return target_slot(sk_netns(sk), num);
}

/* The local port of a socket (host order). */
static __always_inline u16 sk_port(const void *sk)
{
	u16 num = 0;

	READ_KERN(num, sk + AT_OFF_SK_NUM);
	return num;
}

static __always_inline u32 sk_slot(const void *sk)
{
	return sk_slot_port(sk, sk_port(sk));
}

/* skc_target() of a socket whose port is watched (port_watched()), `net` being
 * its sk_net(). */
static __always_inline u32 skc_target_in(const void *sk, const struct at_skc *h,
					 const void *net, int state)
{
	u32 slot = target_slot(net_inum(net), h->num);

	if (slot == AT_NO_SLOT)
		return AT_NO_SLOT;
	if (h->family != AT_AF_INET && h->family != AT_AF_INET6)
		return AT_NO_SLOT;
	if (!sk_protocol_is_tcp(sk))
		return AT_NO_SLOT;
	if (state >= 0 && h->state != state)
		return AT_NO_SLOT;
	return slot;
}

/* The target slot of a TCP socket of a traced listener in the expected state
 * (-1: any state), `h` being its skc_read(); AT_NO_SLOT if it is not one. */
static __always_inline u32 skc_target(const void *sk, const struct at_skc *h, int state)
{
	if (!port_watched(h->num))
		return AT_NO_SLOT;
	return skc_target_in(sk, h, sk_net(sk), state);
}

static __always_inline u32 sk_target(const void *sk, int state)
{
	struct at_skc h;

	skc_read(sk, &h);
	return skc_target(sk, &h, state);
}

/* Fill the 4-tuple of a child socket from its sock_common (`h`: its skc_read()). */
static __always_inline void conn_tuple_from_skc(struct at_conn *c, const void *sk,
						const struct at_skc *h)
{
	c->family = h->family;
	c->sport = (u16)((h->dport_be >> 8) | (h->dport_be << 8)); /* the client's port */
	c->dport = h->num;
	if (h->family == AT_AF_INET) {
		__builtin_memcpy(c->saddr, h->daddr, 4);
		__builtin_memcpy(c->daddr, h->rcv_saddr, 4);
	}
#if AT_HAVE_IPV6
	else {
		bpf_probe_read_kernel(c->saddr, 16, sk + AT_OFF_SK_V6_DADDR);
		bpf_probe_read_kernel(c->daddr, 16, sk + AT_OFF_SK_V6_RCV_SADDR);
	}
#endif
}

static __always_inline void conn_tuple_from_sk(struct at_conn *c, const void *sk)
{
	struct at_skc h;

	skc_read(sk, &h);
	conn_tuple_from_skc(c, sk, &h);
}

/* Send a finished connection to userspace if it is among the slowest. */
static __always_inline void maybe_sample(struct at_conn *c, u64 reason)
{
	u32 slot = c->slot;
	u64 *min = sample_min.lookup(&slot);
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
		count(c->slot, AT_C_LOST_EVENTS);
		return;
	}
	c->sampled = 1;
	__builtin_memcpy(&s->conn, c, sizeof(*c));
	s->reason = reason;
	samples.ringbuf_submit(s, 0);
}

/* The inode of a socket's file (sk->sk_socket->file->f_inode->i_ino): how
 * userspace (sock_diag, /proc/PID/fd) names the same listener. */
static __always_inline u64 sk_inode(const void *sk)
{
	const void *sock = NULL, *file = NULL, *inode = NULL;
	u64 ino = 0;

	READ_KERN(sock, sk + AT_OFF_SK_SOCKET);
	if (sock)
		READ_KERN(file, sock + AT_OFF_SOCKET_FILE);
	if (file)
		READ_KERN(inode, file + AT_OFF_FILE_INODE);
	if (inode)
		READ_KERN(ino, inode + AT_OFF_INODE_INO);
	return ino;
}

/* The listener's last depth, for the per-listener view. */
static __always_inline void listener_seen(const void *lsk, u32 slot, u64 now, u32 depth,
					  u32 max_backlog)
{
	u64 key = (u64)lsk;
	u16 family = 0;
	struct at_listener *l, lzero = {};

	l = listeners.lookup(&key);
	if (!l) {
		READ_KERN(family, lsk + AT_OFF_SK_FAMILY);
		lzero.family = family;
		lzero.port = sk_port(lsk);
		lzero.ino = sk_inode(lsk);
		lzero.slot = slot;
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
static __always_inline void queue_depths(const void *lsk, u32 slot, u64 now)
{
	u32 depth = 0, max_backlog = 0;
	int qlen = 0;

#if AT_SK_BACKLOGS_LEN
	u8 b[AT_SK_BACKLOGS_LEN];

	bpf_probe_read_kernel(b, sizeof(b), lsk + AT_SK_BACKLOGS_START);
	AT_SPAN_GET(depth, b, AT_SK_BACKLOGS_START, AT_OFF_SK_ACK_BACKLOG);
	AT_SPAN_GET(max_backlog, b, AT_SK_BACKLOGS_START, AT_OFF_SK_MAX_ACK_BACKLOG);
#else
	READ_KERN(depth, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
#endif
	READ_KERN(qlen, lsk + AT_OFF_ICSK_ACCEPTQ_QLEN);
	count(slot, AT_C_QUEUED);
	hist_add(slot, AT_H_ACCEPTQ_DEPTH, depth, 1);
	hist_add(slot, AT_H_SYNQ_DEPTH, qlen > 0 ? (u64)qlen : 0, 1);
	listener_seen(lsk, slot, now, depth, max_backlog);
}

/* accept() returned child `sk` of a traced listener, in the accepting task. */
static __always_inline void on_accepted(const void *sk)
{
	u64 now, key;
	u32 tgid, slot;
	struct at_conn *c, zero = {};
	struct at_proc *p, pzero = {};
	struct at_proc_key pk = {};

	if (!sk)
		return;
	key = (u64)sk;
	c = conns.lookup(&key);
	if (c && c->queued_ns && !c->accepted_ns)
		slot = c->slot; /* followed since it was queued: its listener's slot */
	else if ((slot = sk_target(sk, -1)) == AT_NO_SLOT)
		return;
	now = bpf_ktime_get_ns();
	tgid = bpf_get_current_pid_tgid() >> 32;
	count(slot, AT_C_ACCEPTED);

	pk.tgid = tgid;
	pk.slot = slot;
	p = procs.lookup(&pk);
	if (!p) {
		bpf_get_current_comm(pzero.comm, sizeof(pzero.comm));
		procs.update(&pk, &pzero);
		p = procs.lookup(&pk);
	}
	if (p)
		__sync_fetch_and_add(&p->accepted, 1);

	if (!c || !c->queued_ns || c->accepted_ns) {
		/* Queued before we attached, or evicted from the LRU map. */
		count(slot, AT_C_ACCEPT_UNTRACKED);
		zero.accepted_ns = now;
		zero.pid = tgid;
		zero.slot = slot;
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		conn_tuple_from_sk(&zero, sk);
		conns.update(&key, &zero);
		return;
	}
	c->accepted_ns = now;
	c->pid = tgid;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	if (c->syn_ns == 0 && c->syncookie == 0)
		count(slot, AT_C_QUEUE_MISSED);
	hist_add(slot, AT_H_ACCEPT_QUEUE, now - c->queued_ns, 1000);
	if (c->syn_ns)
		hist_add(slot, AT_H_SYN_TO_ACCEPT, now - c->syn_ns, 1000);
}

/* A read of `ret` bytes from socket `sk` (any socket: the port is checked
 * first; only a socket in the per-connection map is one of ours). */
static __always_inline void on_read(const void *sk, long ret)
{
	u64 key = (u64)sk;
	struct at_conn *c;
	u64 now;

	if (ret <= 0 || !sk || !port_watched(sk_port(sk)))
		return;
#if AT_DISPATCH
	{
		/* The thread's entry is written in place: an update of an existing key
		 * still takes a new element and frees the old (~400 ns a read here,
		 * against ~150 ns for lookup and store; bench/prog_cost.py). */
		u32 tid = (u32)bpf_get_current_pid_tgid();
		u64 *last = last_read.lookup(&tid);

		if (last)
			*last = key;
		else
			last_read.update(&tid, &key);
	}
#endif
	c = conns.lookup(&key);
	if (!c || !c->accepted_ns || c->first_read_ns)
		return;
	now = bpf_ktime_get_ns();
	c->first_read_ns = now;
	count(c->slot, AT_C_READ);
	hist_add(c->slot, AT_H_ACCEPT_TO_READ, now - c->accepted_ns, 1000);
}

/*
 * A write of `ret` bytes to socket `sk` (any socket: the port is checked
 * first).  The first bytes written back after the connection's first read are
 * its response, whatever the server: read_to_response, syn_to_response (and,
 * when uvicorn's dispatch was seen, dispatch_to_response).  With keep-alive
 * that is the first request's response; later sends return at the
 * response_ns test.
 */
static __always_inline void on_send(const void *sk, long ret)
{
	u64 key = (u64)sk;
	struct at_conn *c;
	u64 now;

	if (ret <= 0 || !sk || !port_watched(sk_port(sk)))
		return;
	c = conns.lookup(&key);
	if (!c || !c->first_read_ns || c->response_ns)
		return;
	now = bpf_ktime_get_ns();
	c->response_ns = now;
	count(c->slot, AT_C_RESPONDED);
	hist_add(c->slot, AT_H_READ_TO_RESPONSE, now - c->first_read_ns, 1000);
	if (c->syn_ns)
		hist_add(c->slot, AT_H_SYN_TO_RESPONSE, now - c->syn_ns, 1000);
#if AT_DISPATCH
	if (c->dispatch_ns)
		hist_add(c->slot, AT_H_DISPATCH_TO_RESPONSE, now - c->dispatch_ns, 1000);
#endif
	if (c->queued_ns)
		maybe_sample(c, AT_SAMPLE_RESPONSE);
#if !AT_DISPATCH
	/* Without dispatch tracing (no keep-alive requests to count) the
	 * connection's story ends here. */
	conns.delete(&key);
#endif
}

/* The connection closed: send it if it is among the slowest, and forget it.
 * A child not accepted yet is kept: one reset by its client while it waits
 * in the accept queue goes to CLOSE there, and accept() still returns it
 * (forgotten here, it would be counted accept_untracked, its queue time
 * lost).  The state change cannot tell it from a child the kernel frees with
 * its listener (inet_child_forget() closes it the same way), so those stay
 * until the LRU map evicts them: bounded, and never counted (only an
 * accepted connection's missing entry is). */
static __always_inline void on_close(const void *sk)
{
	u64 key = (u64)sk;
	struct at_conn *c = conns.lookup(&key);

	if (c && c->accepted_ns) {
		maybe_sample(c, AT_SAMPLE_CLOSE);
		conns.delete(&key);
	}
}

#if AT_DISPATCH
/*
 * httptools' cb_on_headers_complete (or llhttp_execute when the library is
 * stripped), a uprobe: uvicorn builds the ASGI scope and schedules the app,
 * on the event-loop thread right after that thread read the request: the
 * socket is the one this thread read last (recorded per thread at each
 * read), and only the server's processes (server_pids) count.
 */
static __always_inline int on_dispatch(void)
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
	count(c->slot, AT_C_REQUESTS);
	c->requests++;
	if (c->dispatch_ns)
		return 0; /* keep-alive or pipelined: the stage is the first dispatch */
	now = bpf_ktime_get_ns();
	c->dispatch_ns = now;
	count(c->slot, AT_C_DISPATCHED);
	hist_add(c->slot, AT_H_ACCEPT_TO_DISPATCH, now - c->accepted_ns, 1000);
	if (c->first_read_ns && now >= c->first_read_ns)
		hist_add(c->slot, AT_H_READ_TO_DISPATCH, now - c->first_read_ns, 1000);
	if (c->syn_ns)
		hist_add(c->slot, AT_H_SYN_TO_DISPATCH, now - c->syn_ns, 1000);
	return 0;
}

/* The uprobe itself: every backend's, attached by userspace. */
int on_dispatch_uprobe(struct pt_regs *ctx)
{
	return on_dispatch();
}
#endif

/* A SYN-ACK retransmitted by a traced listener (tcp_retransmit_synack: its
 * first argument is the listener). */
static __always_inline void on_synack_retransmit(const void *lsk)
{
	count(sk_slot(lsk), AT_C_SYNACK_RETRANS); /* count() ignores AT_NO_SLOT */
}

/* A socket reached TCP_CLOSE (inet_sock_set_state): forget the connection if it
 * is one of ours.  The new state is tested first: nine in ten state changes of
 * the machine's sockets end here, before any memory is read.  The port is read
 * from inet_sport: tcp_set_state(TCP_CLOSE) releases the bound port (skc_num = 0)
 * before inet_sk_state_store() fires the tracepoint -- a stale entry would then
 * stay behind and be taken for the next socket allocated at the same address. */
static __always_inline void on_maybe_close(const void *sk, int newstate)
{
	u16 sport_be = 0;

	if (newstate != AT_TCP_CLOSE)
		return;
	READ_KERN(sport_be, sk + AT_OFF_INET_SPORT);
	if (!port_watched((u16)((sport_be >> 8) | (sport_be << 8))) || !sk_protocol_is_tcp(sk))
		return;
	on_close(sk);
}

/* A child made for a traced listener (`h`: its skc_read(), its port watched;
 * `net`: its sk_net()): its target slot, AT_NO_SLOT if it is no target's.
 * inet_csk_clone_lock() fires LISTEN -> SYN_RECV on the clone (the listener's
 * port and namespace, its state not yet stored), the moment
 * tcp_create_openreq_child() counts TcpPassiveOpens.  Not every child is
 * queued: one whose request another CPU's child took first (two final ACKs at
 * once; inet_csk_complete_hashdance(), own_req false) is freed, and the
 * kernel's counter still has it -- connections.created does too, so created -
 * queued is exactly those. */
static __always_inline u32 count_child(const void *sk, const struct at_skc *h,
				       const void *net)
{
	u32 slot = skc_target_in(sk, h, net, -1);

	count(slot, AT_C_CREATED); /* count() ignores AT_NO_SLOT */
	return slot;
}

/* count_child() of a LISTEN -> SYN_RECV change, if `sk` is of a watched port. */
static __always_inline void on_maybe_child(const void *sk, int oldstate, int newstate)
{
	struct at_skc h;

	if (oldstate != AT_TCP_LISTEN || newstate != AT_TCP_SYN_RECV)
		return;
	skc_read(sk, &h);
	if (port_watched(h.num))
		count_child(sk, &h, sk_net(sk));
}

#include "blind.bpf.h"

#endif /* AT_COMMON_BPF_H */
