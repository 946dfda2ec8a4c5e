/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tracepoints.bpf.h -- the accept path from tracepoints only (Linux 6.3+):
 * the logic behind bpf/tracepoint.bpf.c, for kernels where neither fentry nor
 * kprobes may be loaded.
 *
 *   syn        tcp_request_sock.snt_synack of the accept-queue tail when
 *              sock:sk_data_ready fires on the listener (0 for syncookies)
 *   queued     that sk_data_ready event
 *   accepted   syscalls:sys_exit_accept{,4}: fd -> file -> socket -> sk
 *   drops      final ACKs from skb:kfree_skb's reason (6.15+); SYN drops are
 *              only consumed, so userspace derives them from kernel counters
 */
#ifndef AT_TRACEPOINTS_BPF_H
#define AT_TRACEPOINTS_BPF_H

#include "common.bpf.h"

/*
 * The verdict on the last child cloned on this CPU.  A child's three events
 * come on one CPU, in one softirq, one after the other: tcp_check_req() ->
 * tcp_v{4,6}_syn_recv_sock() clones it (LISTEN -> SYN_RECV), then
 * tcp_child_process() moves it to ESTABLISHED and calls the listener's
 * sk_data_ready().  The first event decides whether the child is a traced
 * listener's (namespace, port, family, protocol: four reads and a hash
 * lookup) and leaves the answer here, for a port that is watched; the other
 * two take it when the socket, its port and its namespace (struct net: one
 * read) match, instead of deciding again.  Anything else (another CPU's child
 * at the tail, a socket freed and reused elsewhere) misses, and decides in
 * full.
 */
struct at_child_verdict {
	u64 sk;
	u64 net;      /* its struct net (the listener's) */
	u32 slot;     /* its target slot, or AT_NO_SLOT */
	u16 port;     /* its local port (the listener's) */
	u8 inserted;  /* on_established() made its conns entry, tuple included */
	u8 pad;
};
BPF_PERCPU_ARRAY(child_verdict, struct at_child_verdict, 1);

/* This CPU's verdict if it is on a child (on child `sk`, unless `sk` is NULL:
 * any not yet used) whose port is `port` and whose namespace is the one of
 * `same_net` (the child, or its listener). */
static __always_inline struct at_child_verdict *verdict_of(const void *sk, u16 port,
							   const void *same_net)
{
	u32 zero = 0;
	struct at_child_verdict *v = child_verdict.lookup(&zero);

	if (v && v->sk && (!sk || v->sk == (u64)sk) && v->port == port &&
	    v->net == (u64)sk_net(same_net))
		return v;
	return NULL;
}

/*
 * A child was queued on a listener: sock_def_readable() on the listener,
 * called by tcp_child_process() (and the fastopen path) right after
 * inet_csk_reqsk_queue_add() put it at the accept-queue tail -- on the CPU
 * that cloned it, in the same softirq, so this CPU's verdict names it.
 */
static __always_inline int on_data_ready(const void *lsk)
{
	const void *req = NULL, *child = NULL;
	u64 now, key, snt_us = 0, mine = 0;
	u8 retrans = 0;
	struct at_conn *c, zero = {};
	struct at_child_verdict *v;
	struct at_skc h;
	u32 slot;
	u8 fresh = 0;

	/* It fires for every socket that receives data: the state first (one read
	 * rejects the connections, and has the port and family too), then the
	 * port, then the namespace -- unless this CPU has just cloned a child of
	 * the same port and namespace: that child is the one queued, and its
	 * verdict is the listener's. */
	skc_read(lsk, &h);
	if (h.state != AT_TCP_LISTEN || !port_watched(h.num))
		return 0;
	v = verdict_of(NULL, h.num, lsk);
	if (v) {
		slot = v->slot;
		fresh = v->inserted;
		mine = v->sk;
		v->sk = 0; /* used once */
	} else {
		slot = skc_target(lsk, &h, -1);
	}
	if (slot == AT_NO_SLOT)
		return 0;
	now = bpf_ktime_get_ns();
	queue_depths(lsk, slot, now);

	READ_KERN(req, lsk + AT_OFF_ICSK_ACCEPTQ_TAIL);
	if (req)
		READ_KERN(child, req + AT_OFF_REQ_SK);
	if (!req || !child)
		return 0;
	/* Another CPU queued its child after this CPU's, before this event read the
	 * tail: that child is the other CPU's event's to time (timing it here too
	 * would count it twice), and this CPU's own is known from its state change
	 * (on_state_change(): extra.queue_missed). */
	if (mine && mine != (u64)child)
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
		count(slot, AT_C_ACCEPT_EARLY);
		now = c->accepted_ns;
		hist_add(slot, AT_H_ACCEPT_QUEUE, 0, 1000);
		if (snt_us && snt_us * 1000 <= now)
			hist_add(slot, AT_H_SYN_TO_ACCEPT, now - snt_us * 1000, 1000);
	}
	if (!fresh || !c->family) /* on_established() has just filled it in */
		conn_tuple_from_sk(c, child);
	c->queued_ns = now;
	c->slot = slot;
	c->synack_retrans = retrans;
	if (snt_us && snt_us * 1000 <= now) {
		c->syn_ns = snt_us * 1000;
		c->syn_ok_ns = c->syn_ns;
		c->syncookie = 0;
		count(slot, AT_C_SYN_TIMED);
		hist_add(slot, AT_H_HANDSHAKE, now - c->syn_ns, 1000);
	} else if (!snt_us) {
		c->syn_ns = 0;
		c->syncookie = 1;
		count(slot, AT_C_SYNCOOKIE);
	}
	return 0;
}

/*
 * LISTEN -> SYN_RECV of a clone: a child made (connections.created), and the
 * verdict left for its next two events.
 *
 * SYN_RECV -> ESTABLISHED of a child of the port.  Only a safety net: when
 * two children are queued at once on two CPUs, both sk_data_ready events may
 * see the same tail; the other child is then known from here, with this
 * moment (microseconds before the enqueue) as its queue time.
 */
static __always_inline int on_state_change(const void *sk, int oldstate, int newstate)
{
	u64 key = (u64)sk;
	struct at_conn *c, zero = {};
	struct at_child_verdict *v;
	struct at_skc h;
	const void *net;
	u32 slot, vk = 0;

	if (newstate == AT_TCP_CLOSE) {
		on_maybe_close(sk, newstate);
		return 0;
	}
	if (oldstate == AT_TCP_LISTEN && newstate == AT_TCP_SYN_RECV) {
		/* on_maybe_child(), leaving its verdict for the next two events */
		skc_read(sk, &h);
		if (!port_watched(h.num))
			return 0;
		net = sk_net(sk);
		slot = count_child(sk, &h, net);
		v = child_verdict.lookup(&vk);
		if (v) {
			v->sk = key;
			v->net = (u64)net;
			v->slot = slot;
			v->port = h.num;
			v->inserted = 0;
		}
		return 0;
	}
	/* The states first (no memory read), then the port: ours are the server side. */
	if (oldstate != AT_TCP_SYN_RECV || newstate != AT_TCP_ESTABLISHED)
		return 0;
	skc_read(sk, &h);
	if (!port_watched(h.num))
		return 0;
	v = verdict_of(sk, h.num, sk);
	slot = v ? v->slot : skc_target_in(sk, &h, sk_net(sk), -1);
	if (slot == AT_NO_SLOT)
		return 0;
	c = conns.lookup(&key);
	if (c)
		return 0;
	zero.queued_ns = bpf_ktime_get_ns();
	zero.slot = slot;
	zero.syncookie = 0;
	conn_tuple_from_skc(&zero, sk, &h);
	if (conns.update(&key, &zero) == 0 && v)
		v->inserted = 1;
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
#if AT_HAVE_TASK_BTF
	{
		/* bpf_get_current_task_btf() (5.11) is a BTF-typed pointer: the verifier
		 * turns loads through it, and through the struct pointers loaded from it,
		 * into plain loads guarded by the exception table, a few ns each against
		 * 30-60 ns for a bpf_probe_read_kernel() call.  task->files,
		 * files->fdt, fdt->max_fds and fdt->fd are read so; fd[] (a pointer to
		 * pointers) and what follows are not typed, and stay probe reads. */
		u64 t = (u64)bpf_get_current_task_btf(), f, d;

		f = *(u64 *)(t + AT_OFF_TASK_FILES);
		if (!f)
			return 0;
		d = *(u64 *)(f + AT_OFF_FILES_FDT);
		if (!d)
			return 0;
		max_fds = *(u32 *)(d + AT_OFF_FDT_MAX_FDS);
		fdarr = (const void **)*(u64 *)(d + AT_OFF_FDT_FD);
	}
#else
	task = (struct task_struct *)bpf_get_current_task();
	READ_KERN(files, (void *)task + AT_OFF_TASK_FILES);
	if (!files)
		return 0;
	READ_KERN(fdt, files + AT_OFF_FILES_FDT);
	if (!fdt)
		return 0;
#if AT_FDT_HEAD_LEN
	{
		u8 b[AT_FDT_HEAD_LEN];

		bpf_probe_read_kernel(b, sizeof(b), fdt + AT_FDT_HEAD_START);
		AT_SPAN_GET(max_fds, b, AT_FDT_HEAD_START, AT_OFF_FDT_MAX_FDS);
		AT_SPAN_GET(fdarr, b, AT_FDT_HEAD_START, AT_OFF_FDT_FD);
	}
#else
	READ_KERN(max_fds, fdt + AT_OFF_FDT_MAX_FDS);
	READ_KERN(fdarr, fdt + AT_OFF_FDT_FD);
#endif
#endif
	if ((u64)ret >= max_fds || !fdarr)
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

#if AT_HOOK_KFREE_SKB /* its body needs AT_DROP_REASON_LISTEN_OVERFLOW */
/*
 * The final ACK of a handshake found the accept queue full: tcp_check_req()
 * drops it with SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (6.15+), rx_sk being the
 * listener (6.11+).  SYNs dropped for the same reason are only consumed
 * (consume_skb) and never reach this tracepoint.
 */
static __always_inline int on_kfree_skb(u32 reason, const void *rx_sk)
{
	u32 slot;

	if (reason != AT_DROP_REASON_LISTEN_OVERFLOW || !rx_sk)
		return 0;
	slot = sk_target(rx_sk, AT_TCP_LISTEN);
	count(slot, AT_C_ACK_OVERFLOW); /* count() ignores AT_NO_SLOT */
	return 0;
}
#endif

#endif /* AT_TRACEPOINTS_BPF_H */
