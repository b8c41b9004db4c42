/*
 * The CLAT of 464XLAT (RFC 6877) as two tc programs on a job's own link, in
 * the job's namespace: stateless IPv4/IPv6 translation (RFC 7915, addresses
 * per RFC 6052 with a /96 NAT64 prefix) in the kernel, with no process and
 * no tun device per job.
 *
 *   clat_egress   (clsact egress of the job's link): the job's IPv4, from
 *                 192.0.0.1, leaves as IPv6 from the job's CLAT address
 *                 toward the NAT64 prefix.
 *   clat_ingress  (clsact ingress): IPv6 to the job's CLAT address from the
 *                 NAT64 prefix comes in as IPv4 to 192.0.0.1; ICMPv6 errors
 *                 (their inner packet too) become ICMP errors.
 *
 * One pair of programs serves every job of a larkns process: a job's CLAT
 * address, NAT64 prefix and link MTU are in the hash map `clat_jobs`, keyed
 * by the job's MAC (chosen by larkns, and one a job cannot change: it has no
 * CAP_NET_ADMIN in its namespace).
 *
 * What cannot be translated (IPv4 options, multicast, broadcast, IGMP, ICMP
 * other than echo from the job, fragmented ICMP, UDP without a checksum,
 * UDP segmentation offload, IPv6 extension headers other than a fragment
 * header, IPv6 to the CLAT address from outside the NAT64 prefix) is
 * dropped (TC_ACT_SHOT), which the clsact qdisc counts: never passed on
 * untranslated.
 *
 * Sizes: the job's IPv4 default route has MTU = link MTU - 28 (20 for the
 * larger header, 8 for a fragment header), so the job's own kernel makes
 * every packet fit once translated, and cuts a larger datagram with DF
 * clear in fragments, each translated to an IPv6 fragment.  A packet that
 * still would not fit (a socket that ignores the route's MTU) is answered,
 * when DF is set, with an ICMP "fragmentation needed" and that MTU,
 * redirected back into the job; with DF clear it is dropped (offloaded, its
 * checksum not yet computed, it cannot be cut here).
 *
 * Built with clang -target bpf at install time; loaded by larkns/kernel/
 * clatbpf.py, which resolves `clat_jobs` (the object's one relocation).
 * Everything here is inlined: no BPF-to-BPF calls, no global data.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>

#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define INLINE static __always_inline

/* The map: created and filled by larkns (clatbpf.py); this symbol is only
 * what its instructions refer to. */
struct clat_job {
    __u8 clat6[16];  /* the job's CLAT address (its /64 + ::464) */
    __u8 prefix[12]; /* the NAT64 prefix's 96 bits */
    __u32 mtu;       /* the job's link MTU */
};
char clat_jobs[1] SEC("maps");

#define ETH_LEN 14
#define IP4_LEN 20
#define IP6_LEN 40
#define FRAG_LEN 8
#define L4_OFF4 (ETH_LEN + IP4_LEN)
#define L4_OFF6 (ETH_LEN + IP6_LEN)

#define IPPROTO_FRAG6 44
#define IPPROTO_ICMP6 58

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* 192.0.0.1: the job's IPv4 (RFC 7335); 192.0.0.2: its gateway, the source
 * of the "fragmentation needed" made here; 192.0.0.8 (RFC 7600): the source
 * of ICMP errors from IPv6 hosts outside the NAT64 prefix (a router on the
 * way, the worker itself), which have no IPv4 address. */
#define JOB4 bpf_htonl(0xc0000001)
#define GW4 bpf_htonl(0xc0000002)
#define DUMMY4 bpf_htonl(0xc0000008)

struct ip4 {
    __u8 vihl;
    __u8 tos;
    __u16 tot_len;
    __u16 id;
    __u16 frag_off;
    __u8 ttl;
    __u8 proto;
    __u16 check;
    __u32 saddr;
    __u32 daddr;
};

struct ip6 {
    __u32 vtcfl; /* version, traffic class, flow label */
    __u16 payload_len;
    __u8 nexthdr;
    __u8 hop;
    __u32 saddr[4];
    __u32 daddr[4];
};

struct frag6 {
    __u8 nexthdr;
    __u8 reserved;
    __u16 frag_off; /* offset << 3 | M */
    __u32 id;
};

/* IPv6's pseudo-header, for checksums (RFC 8200 8.1). */
struct pseudo6 {
    __u32 saddr[4];
    __u32 daddr[4];
    __u32 len;
    __u32 nexthdr;
};

/* An ICMP/ICMPv6 header's first 8 bytes. */
struct icmph {
    __u8 type;
    __u8 code;
    __u16 check;
    __u32 rest; /* id+seq, or MTU, or pointer, or unused */
};

INLINE struct clat_job *job_of(const __u8 *mac)
{
    __u64 key = 0;
    __builtin_memcpy(&key, mac, ETH_ALEN);
    return bpf_map_lookup_elem(&clat_jobs, &key);
}

INLINE __u16 fold(__u32 csum)
{
    csum = (csum & 0xffff) + (csum >> 16);
    csum = (csum & 0xffff) + (csum >> 16);
    return (__u16)~csum;
}

INLINE void ip4_checksum(struct ip4 *h)
{
    h->check = 0;
    h->check = fold(bpf_csum_diff(NULL, 0, (void *)h, sizeof(*h), 0));
}

INLINE __u16 csum_off(__u8 proto)
{
    if (proto == IPPROTO_TCP)
        return 16;
    if (proto == IPPROTO_UDP)
        return 6;
    return 2; /* ICMP, ICMPv6 */
}

/* Sets a job-bound IPv6 packet's version, class and flow from an IPv4 TOS. */
INLINE __u32 vtcfl_of(__u8 tos)
{
    return bpf_htonl(0x60000000 | ((__u32)tos << 20));
}

/* ------------------------------------------------------------------------
 * IPv4 from the job -> IPv6
 */

/* "Fragmentation needed" for the packet in skb, turned into it in place and
 * sent back into the job: 192.0.0.2 -> the sender, with the IPv4 header and
 * 8 bytes of what did not fit (RFC 792). */
INLINE int frag_needed(struct __sk_buff *skb, const __u8 *eth, const struct ip4 *orig,
                       __u32 mtu4)
{
    struct {
        struct ip4 ip;
        struct icmph icmp;
        struct ip4 inner;
        __u8 l4[8];
    } msg;
    __u8 macs[12];

    __builtin_memcpy(&msg.inner, orig, sizeof(msg.inner));
    if (bpf_skb_load_bytes(skb, L4_OFF4, msg.l4, sizeof(msg.l4)) < 0)
        return TC_ACT_SHOT;
    /* 28 bytes in front of the original header, then cut after its 8. */
    if (bpf_skb_adjust_room(skb, sizeof(msg.ip) + sizeof(msg.icmp), BPF_ADJ_ROOM_MAC, 0) < 0)
        return TC_ACT_SHOT;
    if (bpf_skb_change_tail(skb, ETH_LEN + sizeof(msg), 0) < 0)
        return TC_ACT_SHOT;

    msg.icmp.type = 3; /* destination unreachable */
    msg.icmp.code = 4; /* fragmentation needed */
    msg.icmp.check = 0;
    msg.icmp.rest = bpf_htonl(mtu4 & 0xffff);
    msg.icmp.check =
        fold(bpf_csum_diff(NULL, 0, (void *)&msg.icmp, sizeof(msg) - sizeof(msg.ip), 0));
    msg.ip.vihl = 0x45;
    msg.ip.tos = 0xc0; /* network control, as the kernel's own ICMP */
    msg.ip.tot_len = bpf_htons(sizeof(msg));
    msg.ip.id = 0;
    msg.ip.frag_off = 0;
    msg.ip.ttl = 64;
    msg.ip.proto = IPPROTO_ICMP;
    msg.ip.saddr = GW4;
    msg.ip.daddr = orig->saddr;
    ip4_checksum(&msg.ip);

    /* The reply goes from the gateway's MAC to the job's. */
    __builtin_memcpy(macs, eth + ETH_ALEN, ETH_ALEN);
    __builtin_memcpy(macs + ETH_ALEN, eth, ETH_ALEN);
    if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0 ||
        bpf_skb_store_bytes(skb, ETH_LEN, &msg, sizeof(msg), 0) < 0)
        return TC_ACT_SHOT;
    return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

/* An IPv6 address in the NAT64 prefix, for IPv4 address a (RFC 6052, /96). */
INLINE void embed(__u32 *out, const struct clat_job *job, __u32 a)
{
    __builtin_memcpy(out, job->prefix, 12);
    out[3] = a;
}

SEC("tc/egress")
int clat_egress(struct __sk_buff *skb)
{
    __u8 eth[ETH_LEN];
    struct ip4 ip;
    struct ip6 ip6;
    struct frag6 frag;
    struct clat_job *job;
    __u32 l4diff = 0;
    __u16 len4, off;
    __u8 proto;
    int first, fragmented;

    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK; /* the job's own IPv6 */
    if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)) < 0 ||
        bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof(ip)) < 0)
        return TC_ACT_SHOT;
    job = job_of(eth + ETH_ALEN);
    if (!job || ip.vihl != 0x45 || ip.saddr != JOB4)
        return TC_ACT_SHOT; /* no job here, IPv4 options, or not the job's address */
    if ((bpf_ntohl(ip.daddr) & 0xf0000000) == 0xe0000000 || ip.daddr == 0xffffffff ||
        (bpf_ntohl(ip.daddr) & 0xfffffff8) == 0xc0000000 || ip.proto == 2)
        return TC_ACT_SHOT; /* multicast, broadcast, the CLAT's own /29, IGMP (RFC 7915 4.1) */

    len4 = bpf_ntohs(ip.tot_len);
    off = bpf_ntohs(ip.frag_off);
    first = !(off & IP_OFFSET);
    fragmented = off & (IP_MF | IP_OFFSET);
    proto = ip.proto;

    if (!skb->gso_size && len4 + IP6_LEN - IP4_LEN + (fragmented ? FRAG_LEN : 0) > job->mtu) {
        /* Too large once translated, from a socket that ignores the route's
         * MTU (IP_PMTUDISC_PROBE, _INTERFACE, _OMIT): DF set, tell it the
         * MTU that fits; DF clear, the packet is offloaded to the device
         * (CHECKSUM_PARTIAL) and cannot be cut here, so it is dropped. */
        if ((off & IP_DF) && !fragmented)
            return frag_needed(skb, eth, &ip, job->mtu - (IP6_LEN - IP4_LEN) - FRAG_LEN);
        return TC_ACT_SHOT;
    }

    if (first) {
        /* The transport checksum: its pseudo-header's addresses change
         * (length and protocol sum the same in both). */
        struct pseudo6 ph;
        __u32 old[2] = {ip.saddr, ip.daddr};

        __builtin_memcpy(ph.saddr, job->clat6, 16);
        embed(ph.daddr, job, ip.daddr);
        if (proto == IPPROTO_ICMP) {
            struct icmph icmp;
            __u32 from = 0, to = 0;
            if (fragmented)
                return TC_ACT_SHOT; /* ICMPv6's pseudo-header needs the whole length */
            if (bpf_skb_load_bytes(skb, L4_OFF4, &icmp, sizeof(icmp)) < 0)
                return TC_ACT_SHOT;
            if ((icmp.type != 8 && icmp.type != 0) || icmp.code != 0)
                return TC_ACT_SHOT; /* echo only: the job's own ICMP errors are not */
            *(__u8 *)&from = icmp.type;
            *(__u8 *)&to = icmp.type == 8 ? 128 : 129;
            ph.len = bpf_htonl(len4 - IP4_LEN);
            ph.nexthdr = bpf_htonl(IPPROTO_ICMP6);
            /* ICMPv6 sums the pseudo-header, ICMP does not. */
            l4diff = bpf_csum_diff(&from, 4, &to, 4, 0);
            l4diff = bpf_csum_diff(NULL, 0, (void *)&ph, sizeof(ph), l4diff);
        } else {
            if (proto == IPPROTO_UDP) {
                __u16 check;
                if (bpf_skb_load_bytes(skb, L4_OFF4 + 6, &check, 2) < 0)
                    return TC_ACT_SHOT;
                if (check == 0)
                    return TC_ACT_SHOT; /* IPv6 requires UDP checksums */
            }
            l4diff = bpf_csum_diff(old, 8, ph.saddr, 32, 0);
        }
    }

    ip6.vtcfl = vtcfl_of(ip.tos);
    ip6.hop = ip.ttl;
    __builtin_memcpy(ip6.saddr, job->clat6, 16);
    embed(ip6.daddr, job, ip.daddr);
    if (fragmented) {
        /* A fragment (the job's kernel cut a datagram larger than its route
         * MTU with DF clear): an IPv6 fragment of the same datagram. */
        frag.nexthdr = proto == IPPROTO_ICMP ? IPPROTO_ICMP6 : proto;
        frag.reserved = 0;
        frag.frag_off = bpf_htons(((off & IP_OFFSET) << 3) | ((off & IP_MF) ? 1 : 0));
        frag.id = bpf_htonl(bpf_ntohs(ip.id));
        ip6.nexthdr = IPPROTO_FRAG6;
        ip6.payload_len = bpf_htons(FRAG_LEN + len4 - IP4_LEN);
    } else {
        ip6.nexthdr = proto == IPPROTO_ICMP ? IPPROTO_ICMP6 : proto;
        ip6.payload_len = bpf_htons(len4 - IP4_LEN);
    }

    if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IPV6), 0) < 0)
        return TC_ACT_SHOT; /* e.g. UDP segmentation offload, which it cannot convert */
    if (fragmented && bpf_skb_adjust_room(skb, FRAG_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
        return TC_ACT_SHOT;
    {
        __u16 proto6 = bpf_htons(ETH_P_IPV6);
        if (bpf_skb_store_bytes(skb, 12 /* ethertype */, &proto6, 2, 0) < 0 ||
            bpf_skb_store_bytes(skb, ETH_LEN, &ip6, sizeof(ip6), 0) < 0)
            return TC_ACT_SHOT;
    }
    if (fragmented && bpf_skb_store_bytes(skb, L4_OFF6, &frag, sizeof(frag), 0) < 0)
        return TC_ACT_SHOT;

    if (first) {
        __u32 l4 = L4_OFF6 + (fragmented ? FRAG_LEN : 0);
        if (proto == IPPROTO_ICMP) {
            __u8 type;
            if (bpf_skb_load_bytes(skb, l4, &type, 1) < 0)
                return TC_ACT_SHOT;
            type = type == 8 ? 128 : 129;
            if (bpf_skb_store_bytes(skb, l4, &type, 1, 0) < 0 ||
                bpf_l4_csum_replace(skb, l4 + 2, 0, l4diff, 0) < 0)
                return TC_ACT_SHOT;
        } else if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
            __u64 flags = BPF_F_PSEUDO_HDR | (proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
            if (bpf_l4_csum_replace(skb, l4 + csum_off(proto), 0, l4diff, flags) < 0)
                return TC_ACT_SHOT;
        }
        /* Other protocols pass with the header translated (RFC 7915 4.1). */
    }
    return TC_ACT_OK;
}

/* ------------------------------------------------------------------------
 * IPv6 to the job's CLAT address -> IPv4
 */

/* ICMPv6 error type/code -> ICMP's (RFC 7915 5.2); 0 when not translated. */
INLINE int icmp_error4(__u8 type6, __u8 code6, __u8 *type, __u8 *code)
{
    switch (type6) {
    case 1: /* destination unreachable */
        *type = 3;
        switch (code6) {
        case 0: case 2: case 3: *code = 1; return 1; /* host unreachable */
        case 1: *code = 10; return 1;                /* administratively prohibited */
        case 4: *code = 3; return 1;                 /* port unreachable */
        }
        return 0;
    case 2: /* packet too big */
        *type = 3;
        *code = 4;
        return 1;
    case 3: /* time exceeded */
        *type = 11;
        *code = code6;
        return code6 <= 1;
    case 4: /* parameter problem: next header -> protocol unreachable */
        *type = 3;
        *code = 2;
        return code6 == 1;
    }
    return 0;
}

INLINE int in_prefix(const struct clat_job *job, const __u32 *a)
{
    const __u32 *p = (const __u32 *)job->prefix;
    return a[0] == p[0] && a[1] == p[1] && a[2] == p[2];
}

INLINE int is_clat6(const struct clat_job *job, const __u32 *a)
{
    const __u32 *c = (const __u32 *)job->clat6;
    return a[0] == c[0] && a[1] == c[1] && a[2] == c[2] && a[3] == c[3];
}

/* An ICMPv6 error about a packet the job sent: ICMP about the IPv4 packet it
 * was.  The outer header shrinks by 20 bytes and the inner one too. */
INLINE int icmp6_error(struct __sk_buff *skb, struct clat_job *job, const struct ip6 *outer,
                       const struct icmph *icmp6)
{
    struct {
        struct icmph icmp;
        struct ip4 inner;
    } msg;
    struct ip6 in6;
    struct ip4 ip;
    __u32 sum, len6 = bpf_ntohs(outer->payload_len);
    __u16 old_check, new_check;
    __u8 type, code;
    __u32 in_l4 = L4_OFF6 + sizeof(struct icmph) + IP6_LEN; /* inner L4, before */
    int has_l4csum = 0;

    if (!icmp_error4(icmp6->type, icmp6->code, &type, &code))
        return TC_ACT_SHOT;
    if (bpf_skb_load_bytes(skb, L4_OFF6 + sizeof(struct icmph), &in6, sizeof(in6)) < 0)
        return TC_ACT_SHOT;
    if (!is_clat6(job, in6.saddr) || !in_prefix(job, in6.daddr))
        return TC_ACT_SHOT; /* not about a packet of the job's CLAT */
    if (in6.nexthdr != IPPROTO_TCP && in6.nexthdr != IPPROTO_UDP && in6.nexthdr != IPPROTO_ICMP6)
        return TC_ACT_SHOT;

    msg.icmp.type = type;
    msg.icmp.code = code;
    msg.icmp.check = 0;
    msg.icmp.rest = 0;
    if (icmp6->type == 2) {
        __u32 mtu = bpf_ntohl(icmp6->rest);
        mtu = mtu > 0xffff + IP6_LEN - IP4_LEN ? 0xffff : mtu - (IP6_LEN - IP4_LEN);
        if (mtu < 68)
            mtu = 68;
        msg.icmp.rest = bpf_htonl(mtu);
    }
    msg.inner.vihl = 0x45;
    msg.inner.tos = (__u8)(bpf_ntohl(in6.vtcfl) >> 20);
    msg.inner.tot_len = bpf_htons(bpf_ntohs(in6.payload_len) + IP4_LEN);
    msg.inner.id = 0;
    msg.inner.frag_off = bpf_htons(IP_DF);
    msg.inner.ttl = in6.hop;
    msg.inner.proto = in6.nexthdr == IPPROTO_ICMP6 ? IPPROTO_ICMP : in6.nexthdr;
    msg.inner.saddr = JOB4;
    msg.inner.daddr = in6.daddr[3];
    ip4_checksum(&msg.inner);

    /* ICMP's checksum from ICMPv6's: less its pseudo-header, its header
     * and the inner IPv6 header, plus the new header and inner IPv4 header
     * (and the inner checksum's change, below).  All sums are of the bytes
     * as they are in the packet. */
    {
        struct pseudo6 ph;
        struct icmph old6 = *icmp6;
        old6.check = 0;
        __builtin_memcpy(ph.saddr, outer->saddr, 16);
        __builtin_memcpy(ph.daddr, outer->daddr, 16);
        ph.len = bpf_htonl(len6);
        ph.nexthdr = bpf_htonl(IPPROTO_ICMP6);
        sum = bpf_csum_diff((void *)&ph, sizeof(ph), NULL, 0, (__u16)~icmp6->check);
        sum = bpf_csum_diff((void *)&old6, sizeof(old6), (void *)&msg.icmp, sizeof(msg.icmp), sum);
        sum = bpf_csum_diff((void *)&in6, sizeof(in6), (void *)&msg.inner, sizeof(msg.inner), sum);
    }

    /* The inner TCP/UDP checksum, when the error carries it: its
     * pseudo-header's addresses change. */
    if ((in6.nexthdr == IPPROTO_TCP || in6.nexthdr == IPPROTO_UDP) &&
        bpf_skb_load_bytes(skb, in_l4 + csum_off(in6.nexthdr), &old_check, 2) == 0 &&
        !(in6.nexthdr == IPPROTO_UDP && old_check == 0)) {
        __u32 a4[2] = {msg.inner.saddr, msg.inner.daddr};
        __u32 o = old_check, n;
        new_check = fold(bpf_csum_diff(in6.saddr, 32, a4, 8, (__u16)~old_check));
        n = new_check;
        sum = bpf_csum_diff(&o, 4, &n, 4, sum);
        has_l4csum = 1;
    }
    msg.icmp.check = fold(sum);

    ip.vihl = 0x45;
    ip.tos = (__u8)(bpf_ntohl(outer->vtcfl) >> 20);
    /* 20 of header and ICMP message 20 shorter (its inner header): len6 */
    ip.tot_len = bpf_htons(len6);
    ip.id = 0;
    ip.frag_off = 0;
    ip.ttl = outer->hop;
    ip.proto = IPPROTO_ICMP;
    ip.saddr = in_prefix(job, outer->saddr) ? outer->saddr[3] : DUMMY4;
    ip.daddr = JOB4;
    ip4_checksum(&ip);

    if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0) < 0)
        return TC_ACT_SHOT;
    /* [eth][20: outer IPv4][8 ICMPv6 + 40 inner IPv6][inner L4]: 20 of the
     * 48 go, the 28 left become the ICMP header and the inner IPv4 header. */
    if (bpf_skb_adjust_room(skb, -(IP6_LEN - IP4_LEN), BPF_ADJ_ROOM_NET, 0) < 0)
        return TC_ACT_SHOT;
    {
        __u16 proto4 = bpf_htons(ETH_P_IP);
        if (bpf_skb_store_bytes(skb, 12 /* ethertype */, &proto4, 2, 0) < 0 ||
            bpf_skb_store_bytes(skb, ETH_LEN, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM) < 0 ||
            bpf_skb_store_bytes(skb, L4_OFF4, &msg, sizeof(msg), BPF_F_RECOMPUTE_CSUM) < 0)
            return TC_ACT_SHOT;
    }
    if (has_l4csum &&
        bpf_skb_store_bytes(skb, L4_OFF4 + sizeof(msg) + csum_off(msg.inner.proto), &new_check,
                            2, BPF_F_RECOMPUTE_CSUM) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

SEC("tc/ingress")
int clat_ingress(struct __sk_buff *skb)
{
    __u8 eth[ETH_LEN];
    struct ip6 ip6;
    struct ip4 ip;
    struct frag6 frag;
    struct clat_job *job;
    __u32 l4diff = 0;
    __u32 len6;
    __u8 proto;
    int fragmented = 0, first = 1;

    if (skb->protocol != bpf_htons(ETH_P_IPV6))
        return TC_ACT_OK;
    if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)) < 0 ||
        bpf_skb_load_bytes(skb, ETH_LEN, &ip6, sizeof(ip6)) < 0)
        return TC_ACT_OK;
    job = job_of(eth);
    if (!job || !is_clat6(job, ip6.daddr))
        return TC_ACT_OK; /* the job's own IPv6 */

    len6 = bpf_ntohs(ip6.payload_len);
    proto = ip6.nexthdr;
    if (proto == IPPROTO_FRAG6) {
        if (bpf_skb_load_bytes(skb, L4_OFF6, &frag, sizeof(frag)) < 0)
            return TC_ACT_SHOT;
        proto = frag.nexthdr;
        fragmented = 1;
        first = !(bpf_ntohs(frag.frag_off) & 0xfff8);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP6)
        return TC_ACT_SHOT; /* another extension header, or a protocol not translated */

    if (proto == IPPROTO_ICMP6) {
        struct icmph icmp;
        if (fragmented)
            return TC_ACT_SHOT;
        if (bpf_skb_load_bytes(skb, L4_OFF6, &icmp, sizeof(icmp)) < 0)
            return TC_ACT_SHOT;
        if (icmp.type < 128)
            return icmp6_error(skb, job, &ip6, &icmp);
        if ((icmp.type != 128 && icmp.type != 129) || icmp.code != 0)
            return TC_ACT_SHOT;
    }
    if (!in_prefix(job, ip6.saddr))
        return TC_ACT_SHOT; /* from outside the NAT64 prefix: no IPv4 address */

    ip.vihl = 0x45;
    ip.tos = (__u8)(bpf_ntohl(ip6.vtcfl) >> 20);
    ip.ttl = ip6.hop;
    ip.proto = proto == IPPROTO_ICMP6 ? IPPROTO_ICMP : proto;
    ip.saddr = ip6.saddr[3];
    ip.daddr = JOB4;
    if (fragmented) {
        __u16 fo = bpf_ntohs(frag.frag_off);
        ip.tot_len = bpf_htons(len6 - FRAG_LEN + IP4_LEN);
        ip.id = bpf_htons((__u16)bpf_ntohl(frag.id));
        ip.frag_off = bpf_htons((fo >> 3) | ((fo & 1) ? IP_MF : 0));
    } else {
        ip.tot_len = bpf_htons(len6 + IP4_LEN);
        ip.id = 0;
        ip.frag_off = bpf_htons(IP_DF);
    }
    ip4_checksum(&ip);

    if (first) {
        __u32 new[2] = {ip.saddr, ip.daddr};
        if (proto == IPPROTO_ICMP6) {
            struct pseudo6 ph;
            __u32 from, to;
            __builtin_memcpy(ph.saddr, ip6.saddr, 16);
            __builtin_memcpy(ph.daddr, ip6.daddr, 16);
            ph.len = bpf_htonl(len6);
            ph.nexthdr = bpf_htonl(IPPROTO_ICMP6);
            l4diff = bpf_csum_diff((void *)&ph, sizeof(ph), NULL, 0, 0);
            if (bpf_skb_load_bytes(skb, L4_OFF6, &from, 1) < 0)
                return TC_ACT_SHOT;
            from &= 0xff;
            to = (from == 128) ? 8 : 0;
            l4diff = bpf_csum_diff(&from, 4, &to, 4, l4diff);
        } else {
            l4diff = bpf_csum_diff(ip6.saddr, 32, new, 8, 0);
        }
    }

    if (fragmented && bpf_skb_adjust_room(skb, -FRAG_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
        return TC_ACT_SHOT;
    if (bpf_skb_change_proto(skb, bpf_htons(ETH_P_IP), 0) < 0)
        return TC_ACT_SHOT;
    {
        __u16 proto4 = bpf_htons(ETH_P_IP);
        if (bpf_skb_store_bytes(skb, 12 /* ethertype */, &proto4, 2, 0) < 0 ||
            bpf_skb_store_bytes(skb, ETH_LEN, &ip, sizeof(ip), BPF_F_RECOMPUTE_CSUM) < 0)
            return TC_ACT_SHOT;
    }
    if (first) {
        if (proto == IPPROTO_ICMP6) {
            __u8 type;
            if (bpf_skb_load_bytes(skb, L4_OFF4, &type, 1) < 0)
                return TC_ACT_SHOT;
            type = type == 128 ? 8 : 0;
            if (bpf_skb_store_bytes(skb, L4_OFF4, &type, 1, BPF_F_RECOMPUTE_CSUM) < 0 ||
                bpf_l4_csum_replace(skb, L4_OFF4 + 2, 0, l4diff, 0) < 0)
                return TC_ACT_SHOT;
        } else {
            __u64 flags = BPF_F_PSEUDO_HDR | (proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
            if (bpf_l4_csum_replace(skb, L4_OFF4 + csum_off(proto), 0, l4diff, flags) < 0)
                return TC_ACT_SHOT;
        }
    }
    return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
