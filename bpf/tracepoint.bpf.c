// SPDX-License-Identifier: Apache-2.0
/*
 * tracepoint.bpf.c -- the tracepoint backend's attach glue: each hook is one
 * line calling its body in tracepoints.bpf.h / common.bpf.h.  BCC attaches
 * every TRACEPOINT_PROBE and RAW_TRACEPOINT_PROBE compiled in when it loads
 * the program; which are compiled in is decided by tracer/selection.py from
 * the rows of tracer/hooks.py (AT_HOOK_<NAME> == AT_ATTACH_TRACEPOINT).
 */
#include "tracepoints.bpf.h"

#if AT_HOOK_SK_DATA_READY == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(sk_data_ready)
{ return on_data_ready((const void *)ctx->args[0]); }
#endif

#if AT_HOOK_INET_SOCK_SET_STATE == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{ return on_state_change((const void *)ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]); }
#endif

#if AT_HOOK_SYS_EXIT_ACCEPT4 == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{ return on_accept_exit(args->ret); }
#endif

#if AT_HOOK_SYS_EXIT_ACCEPT == AT_ATTACH_TRACEPOINT
TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{ return on_accept_exit(args->ret); }
#endif

#if AT_HOOK_SOCK_RECV_LENGTH == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(sock_recv_length)
{ on_read((const void *)ctx->args[0], (int)ctx->args[1]); return 0; }
#endif

#if AT_HOOK_SOCK_SEND_LENGTH == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(sock_send_length)
{ on_send((const void *)ctx->args[0], (int)ctx->args[1]); return 0; }
#endif

#if AT_HOOK_TCP_RETRANSMIT_SYNACK == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(tcp_retransmit_synack)
{ on_synack_retransmit((const void *)ctx->args[0]); return 0; }
#endif

#if AT_HOOK_KFREE_SKB == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(kfree_skb)
{ return on_kfree_skb((u32)ctx->args[2], (const void *)ctx->args[3]); }
#endif

#if AT_HOOK_SOFTIRQ_ENTRY == AT_ATTACH_RAW_TRACEPOINT
RAW_TRACEPOINT_PROBE(softirq_entry)
{ return on_softirq_entry((u32)ctx->args[0]); }
#endif
