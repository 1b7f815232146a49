/* Bounds-checked walking of netlink datagrams and attribute streams.
 *
 * Every kernel message ipsecchan reads (XFRM dumps and events, sock_diag) passes through
 * these two functions first, so they never trust a length field: each span they return
 * lies wholly inside the buffer they were given. */
#ifndef IPSECCHAN_NLMSG_H
#define IPSECCHAN_NLMSG_H

#include <stddef.h>
#include <stdint.h>

struct ipsecchan_nlspan {
    uint32_t offset;   /* of the message header (nlmsghdr) in the buffer */
    uint32_t len;      /* nlmsg_len: header + payload, unpadded */
    uint16_t type;
    uint16_t flags;
    uint32_t seq;
    uint32_t pid;
};

struct ipsecchan_attrspan {
    uint32_t offset;   /* of the attribute's payload in the buffer */
    uint32_t len;      /* payload length */
    uint16_t type;     /* nla_type without the NESTED / BYTEORDER flag bits */
    uint16_t flags;    /* those flag bits */
};

enum {
    IPSECCHAN_NL_OK = 0,
    IPSECCHAN_NL_ETRUNC = -1,    /* fewer bytes left than a header */
    IPSECCHAN_NL_ESHORT = -2,    /* length field smaller than the header it is part of */
    IPSECCHAN_NL_EOVER = -3,     /* length field runs past the end of the buffer */
    IPSECCHAN_NL_ESPACE = -4,    /* more items than the output array holds */
};

/* Split buf[0..len) into netlink messages. Returns the number of spans written to out, or a
 * negative IPSECCHAN_NL_E* code; *bad_offset receives the offset of the offending header. */
int ipsecchan_nl_split(const uint8_t *buf, size_t len, struct ipsecchan_nlspan *out,
                       size_t max_out, size_t *bad_offset);

/* Split an attribute stream (struct nlattr TLVs, 4-byte aligned) the same way. */
int ipsecchan_nla_split(const uint8_t *buf, size_t len, struct ipsecchan_attrspan *out,
                        size_t max_out, size_t *bad_offset);

#endif
