/* SPDX-License-Identifier: Apache-2.0 */
/*
 * acceptrace.h -- layouts and constants shared by the BPF programs (bpf/<backend>.bpf.c,
 * bpf/<name>.bpf.h) and userspace (tracer/layout.py mirrors what it reads with ctypes,
 * tracer/hist.py the bucketing, tracer/hooks.py the attach types; tests check
 * that both sides agree).
 *
 * This header must not include kernel headers: it is also compiled as plain
 * userspace C by the tests.  Kernel struct offsets never appear here; they
 * come from BTF at run time as -D defines (see tracer/kernel.py).
 */
#ifndef ACCEPTRACE_H
#define ACCEPTRACE_H

#ifdef AT_USERSPACE /* the tests compile this header with -DAT_USERSPACE */
#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
#endif

/* ------------------------------------------------------------------------
 * Log-linear histogram buckets.
 *
 * A value v (a non-negative integer: microseconds for durations, connections
 * for queue depths) falls in bucket
 *   v < 16                      -> bucket v, bounds [v, v+1)
 *   2^e <= v < 2^(e+1), e >= 4  -> bucket 16*(e-3) + (v >> (e-4)) - 16,
 *                                  16 equal sub-buckets per power of two
 * so a bucket is never wider than 1/16 (6.25%) of its lower bound.  Values
 * of 2^32 and above are clamped to 2^32-1 (about 71.6 minutes in us).
 * ------------------------------------------------------------------------ */
#define AT_HIST_SUB_BITS 4
#define AT_HIST_SUB (1 << AT_HIST_SUB_BITS)          /* 16 */
#define AT_HIST_MAX_EXP 32                            /* clamp at 2^32-1 */
#define AT_HIST_NBUCKETS (AT_HIST_SUB * (AT_HIST_MAX_EXP - AT_HIST_SUB_BITS + 1)) /* 464 */

static inline __attribute__((always_inline)) u32 at_ilog2(u64 v)
{
	/* floor(log2(v)) for v > 0, branch-only (no loops for the verifier). */
	u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8)  { v >>= 8;  r += 8; }
	if (v >> 4)  { v >>= 4;  r += 4; }
	if (v >> 2)  { v >>= 2;  r += 2; }
	if (v >> 1)  { r += 1; }
	return r;
}

static inline __attribute__((always_inline)) u32 at_hist_bucket(u64 v)
{
	u32 e;

	if (v >= (1ULL << AT_HIST_MAX_EXP))
		v = (1ULL << AT_HIST_MAX_EXP) - 1;
	if (v < AT_HIST_SUB)
		return (u32)v;
	e = at_ilog2(v);
	return AT_HIST_SUB * (e - AT_HIST_SUB_BITS + 1) + (u32)(v >> (e - AT_HIST_SUB_BITS)) - AT_HIST_SUB;
}

/* One histogram, kept per CPU in the kernel and summed by userspace. */
struct at_hist {
	u64 count;
	u64 sum;       /* in the histogram's base unit: ns for durations, connections for depths */
	u64 min;       /* 0 with count == 0 */
	u64 max;
	u64 buckets[AT_HIST_NBUCKETS]; /* bucket of (value / AT_HIST_SCALE[kind]) */
};

/* ------------------------------------------------------------------------
 * Per-target rows.  Each traced listener (network namespace, port) has a
 * target slot 0..AT_SLOTS-1 (the value of its `targets` map entry; AT_SLOTS is
 * a -D define: how many this run holds, decided in tracer/selection.py).
 *   hists:    AT_SLOTS rows of AT_H_COUNT, index slot * AT_H_COUNT + id
 *   counters: AT_SLOTS + 1 rows of AT_C_COUNT, index slot * AT_C_COUNT + id;
 *             row AT_SLOTS is run-wide (what belongs to no one listener:
 *             AT_C_SOFTIRQ_BUSY, AT_C_PACKETS_UNSEEN)
 * so the sum over the rows is the run's total and each row is exact for its
 * listener.
 * ------------------------------------------------------------------------ */
#define AT_NO_SLOT 0xffffffffU

/* Histogram ids (within a target's row of the `hists` per-CPU array). */
enum at_hist_id {
	AT_H_HANDSHAKE = 0,      /* queued - syn            (ns, bucketed in us) */
	AT_H_ACCEPT_QUEUE = 1,   /* accepted - queued       (ns, bucketed in us) */
	AT_H_SYN_TO_ACCEPT = 2,  /* accepted - syn          (ns, bucketed in us) */
	AT_H_ACCEPT_TO_READ = 3, /* first_read - accepted   (ns, bucketed in us) */
	AT_H_ACCEPTQ_DEPTH = 4,  /* sk_ack_backlog at each enqueue (connections) */
	AT_H_SYNQ_DEPTH = 5,     /* icsk_accept_queue.qlen at each enqueue (connections) */
	AT_H_ACCEPT_TO_DISPATCH = 6,   /* first ASGI dispatch - accepted (AT_DISPATCH) */
	AT_H_READ_TO_DISPATCH = 7,     /* first ASGI dispatch - first read */
	AT_H_SYN_TO_DISPATCH = 8,      /* first ASGI dispatch - syn */
	AT_H_DISPATCH_TO_RESPONSE = 9, /* first byte written - first dispatch */
	AT_H_READ_TO_RESPONSE = 10,    /* first byte written after the first read - first read */
	AT_H_SYN_TO_RESPONSE = 11,     /* that first byte written - syn */
	AT_H_COUNT = 12,
};

/* Counter ids (within a row of the `counters` per-CPU array). */
enum at_counter_id {
	AT_C_QUEUED = 0,           /* children queued on a traced listener */
	AT_C_SYN_TIMED = 1,        /* ... of which the SYN time was recovered */
	AT_C_SYNCOOKIE = 2,        /* ... of which came from a syncookie (no SYN time) */
	AT_C_ACCEPTED = 3,         /* accept()/accept4() returned a socket of the port */
	AT_C_READ = 4,             /* first read of request bytes after accept */
	AT_C_SYNACK_RETRANS = 5,   /* tcp:tcp_retransmit_synack on the port */
	AT_C_ACK_OVERFLOW = 6,     /* final ACK dropped, accept queue full (kfree_skb reason) */
	AT_C_LOST_EVENTS = 7,      /* ring buffer full: a sample could not be sent */
	AT_C_ACCEPT_UNTRACKED = 8, /* accepted, but queued before we attached (or evicted) */
	AT_C_QUEUE_MISSED = 9,     /* child seen ESTABLISHED but not at the queue tail */
	AT_C_DISPATCHED = 10,      /* connections with a first ASGI dispatch (AT_DISPATCH) */
	AT_C_REQUESTS = 11,        /* every dispatch: requests, keep-alive ones included */
	AT_C_RESPONDED = 12,       /* connections that wrote a first byte back after their first read */
	/* Decision points inside tcp_conn_request / tcp_v{4,6}_syn_recv_sock:
	 * only the fentry and kprobe backends see these (tracepoint: 0, reported null). */
	AT_C_SYNS = 13,                /* SYNs that reached tcp_conn_request of the port */
	AT_C_SYN_DROPPED_ACCEPTQ = 14, /* SYN dropped, accept queue full (ListenOverflows) */
	AT_C_SYN_DROPPED_SYNQ = 15,    /* SYN dropped, SYN queue full, no syncookies (TCPReqQFullDrop) */
	AT_C_SYNCOOKIES_SENT = 16,     /* SYN answered with a syncookie (SyncookiesSent) */
	AT_C_LISTEN_DROPS_OTHER = 17,  /* other tcp_listendrop()s: no memory, no route, LSM, ... */
	AT_C_SYN_RETRIED = 18,         /* children whose client had to retransmit its SYN */
	AT_C_ACCEPT_EARLY = 19,    /* tracepoint: accepted on another CPU before sk_data_ready
	                            * (counted in AT_C_ACCEPT_UNTRACKED first, then fixed up) */
	AT_C_SOFTIRQ_BUSY = 20,    /* network/timer softirqs that began while this CPU was in a
	                            * kprobe or tracepoint BPF program (AT_KSYM_*)      */
	AT_C_PACKETS_UNSEEN = 21,  /* TCP packets to the port received in such a NET_RX softirq
	                            * (kprobe-fed drop counters only) */
	AT_C_CREATED = 22,         /* children made for a traced listener (LISTEN -> SYN_RECV
	                            * of the clone): the kernel's TcpPassiveOpens */
	AT_C_COUNT = 23,
};

/* Per-connection state, keyed by the child struct sock * (LRU hash). */
struct at_conn {
	u64 syn_ns;        /* first SYN of the 4-tuple; 0: unknown (not seen, or a syncookie
	                    * connection under the tracepoint backend) */
	u64 queued_ns;     /* 0: unknown */
	u64 accepted_ns;   /* 0: not accepted yet */
	u64 first_read_ns; /* 0: not read yet */
	u64 dispatch_ns;   /* first ASGI dispatch (httptools headers complete); 0: none */
	u64 response_ns;   /* first byte written after the first read; 0: none */
	u64 syn_ok_ns;     /* the SYN that got through (== syn_ns unless the client retransmitted) */
	u32 requests;      /* dispatches on this connection (keep-alive, pipelining) */
	u32 pid;           /* tgid of the accepting process */
	u32 slot;          /* the target slot of its listener */
	u16 family;        /* AF_INET / AF_INET6 */
	u16 sport;         /* client port (host order) */
	u16 dport;         /* server port (host order) */
	u8 syncookie;
	u8 synack_retrans; /* request_sock.num_retrans at enqueue */
	u8 sampled;        /* already sent to userspace */
	u8 syn_retrans;    /* client SYN retransmits before one got through (fentry/kprobe) */
	u8 flags;          /* AT_CONN_* */
	u8 pad;
	u8 saddr[16];      /* client address (IPv4 in the first 4 bytes) */
	u8 daddr[16];      /* server address */
	char comm[16];
};

#define AT_CONN_SYN_SEEN 1 /* syn_retrans is known: the first SYN was seen (fentry/kprobe) */

/* What a traced listener is: its network namespace (net->ns.inum) and local
 * port.  Userspace fills the `targets` map with these at start and may change
 * it while the programs run. */
struct at_target {
	u32 netns;
	u16 port;          /* host order */
	u16 pad;
};

/* How a hook's glue is attached: the value of its AT_HOOK_<NAME> define
 * (tracer/hooks.py decides it; AT_ATTACH_OFF compiles the glue out). */
#define AT_ATTACH_OFF 0
#define AT_ATTACH_FENTRY 1         /* fentry/fexit: BCC attaches it on load */
#define AT_ATTACH_KPROBE 2         /* kprobe/kretprobe: userspace attaches it */
#define AT_ATTACH_TRACEPOINT 3     /* BCC attaches it on load */
#define AT_ATTACH_RAW_TRACEPOINT 4 /* BCC attaches it on load */

/* A finished connection sent to userspace when it is among the slowest. */
struct at_sample {
	struct at_conn conn;
	u64 reason;        /* AT_SAMPLE_READ or AT_SAMPLE_CLOSE */
};

#define AT_SAMPLE_READ 1
#define AT_SAMPLE_CLOSE 2
#define AT_SAMPLE_RESPONSE 3

/* Per-process accept counts, keyed by (tgid, target slot). */
struct at_proc_key {
	u32 tgid;
	u32 slot;
};

struct at_proc {
	u64 accepted;
	char comm[16];
};

/* What the kernel last saw of a listener, keyed by its struct sock *. */
struct at_listener {
	u64 last_ns;
	u32 max_backlog;   /* sk_max_ack_backlog */
	u32 max_depth;     /* largest sk_ack_backlog seen at enqueue */
	u16 family;
	u16 port;
	u32 slot;          /* its target slot */
	u64 ino;           /* the socket's inode, as sock_diag and /proc/PID/fd show it */
};

/* A 4-tuple as seen in a packet (client = s, server = d), IPv4 in the first 4 bytes. */
struct at_tuple {
	u8 saddr[16];
	u8 daddr[16];
	u16 sport;         /* host order */
	u16 dport;
	u8 family;         /* 4 or 6: the packet's IP version */
	u8 pad[3];
};

/* SYNs of one 4-tuple that reached tcp_conn_request, until a child exists. */
struct at_syn {
	u64 first_ns;
	u64 last_ns;
	u32 count;
	u8 cookie;         /* the last SYN was answered with a syncookie */
	u8 pad[3];
};

#endif /* ACCEPTRACE_H */
