#include <string.h>
#include <linux/netlink.h>

#include "nlmsg.h"

#define ALIGN4(n) (((n) + 3u) & ~(size_t)3u)

int ipsecchan_nl_split(const uint8_t *buf, size_t len, struct ipsecchan_nlspan *out,
                       size_t max_out, size_t *bad_offset)
{
    size_t off = 0;
    size_t n = 0;

    while (off < len) {
        struct nlmsghdr h;
        *bad_offset = off;
        if (len - off < sizeof(h))
            return IPSECCHAN_NL_ETRUNC;
        memcpy(&h, buf + off, sizeof(h));   /* the buffer need not be aligned */
        if (h.nlmsg_len < sizeof(h))
            return IPSECCHAN_NL_ESHORT;
        if (h.nlmsg_len > len - off)
            return IPSECCHAN_NL_EOVER;
        if (n == max_out)
            return IPSECCHAN_NL_ESPACE;
        out[n].offset = (uint32_t)off;
        out[n].len = h.nlmsg_len;
        out[n].type = h.nlmsg_type;
        out[n].flags = h.nlmsg_flags;
        out[n].seq = h.nlmsg_seq;
        out[n].pid = h.nlmsg_pid;
        n++;
        /* The padding after the last message may be missing; never step past len. */
        size_t step = ALIGN4((size_t)h.nlmsg_len);
        off = step > len - off ? len : off + step;
    }
    return (int)n;
}

int ipsecchan_nla_split(const uint8_t *buf, size_t len, struct ipsecchan_attrspan *out,
                        size_t max_out, size_t *bad_offset)
{
    size_t off = 0;
    size_t n = 0;

    while (off < len) {
        struct nlattr a;
        *bad_offset = off;
        if (len - off < sizeof(a))
            return IPSECCHAN_NL_ETRUNC;
        memcpy(&a, buf + off, sizeof(a));
        if (a.nla_len < sizeof(a))
            return IPSECCHAN_NL_ESHORT;
        if (a.nla_len > len - off)
            return IPSECCHAN_NL_EOVER;
        if (n == max_out)
            return IPSECCHAN_NL_ESPACE;
        out[n].offset = (uint32_t)(off + sizeof(a));
        out[n].len = (uint32_t)(a.nla_len - sizeof(a));
        out[n].type = a.nla_type & NLA_TYPE_MASK;
        out[n].flags = a.nla_type & (NLA_F_NESTED | NLA_F_NET_BYTEORDER);
        n++;
        size_t step = ALIGN4((size_t)a.nla_len);
        off = step > len - off ? len : off + step;
    }
    return (int)n;
}
