/* SPDX-License-Identifier: Apache-2.0 */
/*
 * funcs.bpf.h -- the accept path seen from its kernel functions: the logic
 * behind the fentry and kprobe backends' glue (bpf/fentry.bpf.c,
 * bpf/kprobe.bpf.c), which differ only in how they attach.
 *
 *   syn        tcp_conn_request entry: the first SYN of the 4-tuple, kept by
 *              4-tuple until a child exists (syncookies included)
 *   queued     inet_csk_complete_hashdance / inet_csk_reqsk_queue_add
 *   drops      each at its decision point: SYN (accept queue full, SYN queue
 *              full, other), syncookie sent, final ACK (syn_recv_sock NULL);
 *              together every tcp_listendrop() of a traced listener, so they
 *              add up to the kernel's TcpExtListenDrops
 *
 * Arguments are read by position only where that position is stable; return
 * values come from the glue (bpf_get_func_ret() or the return register).
 */
#ifndef AT_FUNCS_BPF_H
#define AT_FUNCS_BPF_H

#include "common.bpf.h"
#include "skb.bpf.h"

/* A SYN of the same 4-tuple within this window is a retransmit of the first
 * (tcp_syn_retries=6 gives up after 127 s). */
#define AT_SYN_WINDOW_NS (130ULL * 1000000000ULL)

/* The SYNs of a 4-tuple, from its first SYN until the child exists.  Bounded:
 * a SYN that never completes is evicted, never leaked. */
BPF_TABLE("lru_hash", struct at_tuple, struct at_syn, syns, AT_CONN_MAX);

/* What tcp_conn_request on this CPU is deciding (softirq: no nesting per CPU). */
struct at_synctx {
	u64 lsk;          /* the listener, 0: no SYN of ours in progress */
	u64 now;
	u32 slot;         /* its target slot */
	u32 pad0;
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
	u32 slot;
	u8 acceptq_full;
	u8 pad[3];
};
BPF_PERCPU_ARRAY(rsctx, struct at_rsctx, 2);

/* The child inet_csk_reqsk_queue_add() last queued on this CPU (see on_queue_done). */
struct at_qmark {
	u64 child;
	u64 ns;
};
BPF_PERCPU_ARRAY(qmark, struct at_qmark, 1);

/* tcp_conn_request() entry: a SYN reached listener `lsk`. */
static __always_inline void on_syn(const void *lsk, const void *skb)
{
	u32 zero = 0, backlog = 0, max_backlog = 0;
	int qlen = 0;
	const void *net = NULL;
	struct at_synctx *x;
	struct at_syn *s, snew = {};
	u32 slot = sk_target(lsk, AT_TCP_LISTEN);

	if (slot == AT_NO_SLOT)
		return;
	x = synctx.lookup(&zero);
	if (!x)
		return;
	__builtin_memset(x, 0, sizeof(*x));
	x->lsk = (u64)lsk;
	x->now = bpf_ktime_get_ns();
	x->slot = slot;
	count(slot, AT_C_SYNS);

	/* The two tests tcp_conn_request() makes, as it makes them. */
	READ_KERN(qlen, lsk + AT_OFF_ICSK_ACCEPTQ_QLEN);
	READ_KERN(backlog, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
	/* inet_csk_reqsk_queue_is_full(): qlen > max (6.x; ">=" on older kernels,
	 * whose boundary case on_syn_done() also attributes to the SYN queue). */
	x->synq_full = synq_full((u32)qlen, max_backlog);
	x->synq_at_limit = synq_at_limit((u32)qlen, max_backlog);
	x->acceptq_full = backlog > max_backlog;
	READ_KERN(net, lsk + AT_OFF_SK_NET);
	if (net) /* the listener's namespace's net.ipv4.tcp_syncookies */
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

/* sk_acceptq_is_full() of a listener, read now. */
static __always_inline u8 acceptq_full_now(const void *lsk)
{
	u32 backlog = 0, max_backlog = 0;

	READ_KERN(backlog, lsk + AT_OFF_SK_ACK_BACKLOG);
	READ_KERN(max_backlog, lsk + AT_OFF_SK_MAX_ACK_BACKLOG);
	return backlog > max_backlog;
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
		count(x->slot, AT_C_SYNCOOKIES_SENT);
		s = syns.lookup(&x->t);
		if (s)
			s->cookie = 1;
	}
#if AT_HOOK_INET_CSK_REQSK_QUEUE_HASH_ADD
	dropped = !(x->outcome & (AT_OUT_COOKIE | AT_OUT_HASHED | AT_OUT_CHILD));
#else
	/* No hook on the SYN-queue insert here: judge by the two tests alone. */
	dropped = (x->synq_full && !x->syncookies) || x->acceptq_full;
#endif
	if (dropped) {
		/* Order of the tests in tcp_conn_request(): SYN queue first, where
		 * syncookies (if on) rescue the SYN, then the accept queue -- which a
		 * final ACK on another CPU may have filled since the entry read it
		 * (the listener is lockless): a dropped SYN meeting a full queue now
		 * met it at the kernel's test too. */
		if (x->synq_full && !x->syncookies)
			count(x->slot, AT_C_SYN_DROPPED_SYNQ);
		else if (x->acceptq_full || (AT_HOOK_INET_CSK_REQSK_QUEUE_HASH_ADD &&
					     acceptq_full_now((const void *)x->lsk)))
			count(x->slot, AT_C_SYN_DROPPED_ACCEPTQ);
		else if (x->synq_at_limit && !x->syncookies)
			count(x->slot, AT_C_SYN_DROPPED_SYNQ);
		else
			count(x->slot, AT_C_LISTEN_DROPS_OTHER);
	}
	x->lsk = 0;
}

/* tcp_v{4,6}_syn_recv_sock() entry: note what its exit needs.  `v6` picks the slot. */
static __always_inline void on_ack_start(u32 v6, const void *lsk, const void *skb)
{
	struct at_rsctx *r = rsctx.lookup(&v6);
	u32 slot;

	if (!r)
		return;
	r->lsk = 0;
	slot = sk_target(lsk, AT_TCP_LISTEN);
	if (slot == AT_NO_SLOT)
		return;
	r->lsk = (u64)lsk;
	r->slot = slot;
	r->skb = (u64)skb;
	r->acceptq_full = acceptq_full_now(lsk);
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

	const void *lsk;

	if (!r || !r->lsk)
		return;
	lsk = (const void *)r->lsk;
	r->lsk = 0;
	if (child)
		return; /* the child is followed from the queue insert (on_queue_start) */
	if (skb_ip_version((const void *)r->skb, &head, &nh) != (v6 ? 6 : 4))
		return;
	/* Full at entry, or filled since by a child queued on another CPU (the
	 * listener is lockless) before the function's own first test. */
	count(r->slot,
	      r->acceptq_full || acceptq_full_now(lsk) ? AT_C_ACK_OVERFLOW : AT_C_LISTEN_DROPS_OTHER);
}

/* The 4-tuple of a child socket, keyed as its SYN was (v4-mapped peers as IPv4). */
static __always_inline void sk_tuple(const void *sk, struct at_tuple *t)
{
	u16 family = 0, dport_be = 0;
	u8 v6d[16] = {};

	READ_KERN(family, sk + AT_OFF_SK_FAMILY);
	READ_KERN(dport_be, sk + AT_OFF_SK_DPORT);
	t->sport = (u16)((dport_be >> 8) | (dport_be << 8));
	t->dport = sk_port(sk);
	t->family = 4;
#if AT_HAVE_IPV6
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
	u32 slot;

	if (!child)
		return;
	slot = sk_target(lsk, AT_TCP_LISTEN);
	if (slot == AT_NO_SLOT)
		return;
	now = bpf_ktime_get_ns();
	old = conns.lookup(&key);
	if (old && !old->accepted_ns && old->queued_ns && now - old->queued_ns < 1000000)
		return; /* queue_add called from the hashdance: the outer entry did it */
	sk_tuple(child, &t);
	c.queued_ns = now;
	c.slot = slot;
	c.family = t.family == 6 ? AT_AF_INET6 : AT_AF_INET;
	__builtin_memcpy(c.saddr, t.saddr, 16);
	__builtin_memcpy(c.daddr, t.daddr, 16);
	c.sport = t.sport;
	c.dport = t.dport;
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
	u32 zero = 0, slot;

	if (!child)
		return;
	slot = sk_target(lsk, AT_TCP_LISTEN);
	if (slot == AT_NO_SLOT)
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
	queue_depths(lsk, slot, now);
	if (!c || !(c->flags & AT_CONN_SYN_SEEN))
		return;
	count(slot, AT_C_SYN_TIMED);
	if (c->syn_retrans)
		count(slot, AT_C_SYN_RETRIED);
	if (c->syncookie)
		count(slot, AT_C_SYNCOOKIE);
	if (c->queued_ns >= c->syn_ok_ns)
		hist_add(slot, AT_H_HANDSHAKE, c->queued_ns - c->syn_ok_ns, 1000);
}

/* sock:inet_sock_set_state: a child of a traced listener made, or closed. */
static __always_inline int on_child_state(const void *sk, int oldstate, int newstate)
{
	on_maybe_child(sk, oldstate, newstate);
	on_maybe_close(sk, newstate);
	return 0;
}

#endif /* AT_FUNCS_BPF_H */
