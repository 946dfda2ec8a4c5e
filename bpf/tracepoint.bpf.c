// SPDX-License-Identifier: Apache-2.0
/*
 * tracepoint.bpf.c -- the tracepoint backend's attach glue: each hook is one
 * line calling its body in tracepoints.bpf.h / common.bpf.h.  BCC attaches
 * every TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE compiled in when it loads
 * the program; which are compiled in is decided by tracer/selection.py from
 * the rows of tracer/hooks.py (AT_HOOK_<NAME> == AT_ATTACH_TRACEPOINT).
 */
#include "tracepoints.bpf.h"

#if AT_HOOK_KFREE_SKB
/* BCC generates kfree_skb's argument struct from tracefs, which names this
 * enum; a complete declaration is all it needs (the values come from BTF). */
enum skb_drop_reason { AT_SKB_DROP_REASON_PLACEHOLDER = 0 };
#endif

#if AT_HOOK_SK_DATA_READY == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(sock, sk_data_ready)
{ return on_data_ready(args->skaddr, args->protocol); }
#endif

#if AT_HOOK_INET_SOCK_SET_STATE == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{ return on_state_change(args->skaddr, args->protocol, args->sport, args->oldstate, args->newstate); }
#endif

#if AT_HOOK_SYS_EXIT_ACCEPT4 == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{ return on_accept_exit(args->ret); }
#endif

#if AT_HOOK_SYS_EXIT_ACCEPT == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{ return on_accept_exit(args->ret); }
#endif

#if AT_HOOK_SOCK_RECV_LENGTH == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(sock, sock_recv_length)
{ on_recv_length(args->protocol, args->sk, args->ret); return 0; }
#endif

#if AT_HOOK_SOCK_SEND_LENGTH == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(sock, sock_send_length)
{ on_send_length(args->protocol, args->sk, args->ret); return 0; }
#endif

#if AT_HOOK_TCP_RETRANSMIT_SYNACK == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{ on_synack_retransmit(args->skaddr, args->sport); return 0; }
#endif

#if AT_HOOK_KFREE_SKB == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(skb, kfree_skb)
{ return on_kfree_skb(args->reason, args->rx_sk); }
#endif

#if AT_HOOK_SOFTIRQ_ENTRY == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(softirq_entry)
{ return on_softirq_entry((u32)ctx->args[0]); }
#endif
