/* SPDX-License-Identifier: Apache-2.0 */
/*
 * skb.bpf.h -- a packet's IP version and 4-tuple from its headers, for the
 * function hooks (the SYN and the final ACK reach them as an sk_buff) and the
 * blind-spot packet counter.  Needs the AT_OFF_SKB_* offsets, which userspace
 * resolves for the function backends only.
 */
#ifndef AT_SKB_BPF_H
#define AT_SKB_BPF_H

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

/* The 4-tuple of a TCP packet (SYN or final ACK); -1 if it cannot be read. */
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

#endif /* AT_SKB_BPF_H */
