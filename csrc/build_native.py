"""cffi build script (API mode) for ipsecchan._native.

Kept apart from the Python API, as cryptography does: setup.py names it in cffi_modules and
tests/test_native_asan.py rebuilds the same sources with AddressSanitizer.

The XFRM structures below are declared with "...;" so that the C compiler, reading the real
<linux/xfrm.h>, fixes their sizes and field offsets: message layouts are checked against the
kernel header at build time, never copied by hand.
"""
import os

from cffi import FFI

# setuptools wants source paths relative to the project root (its working directory).
HERE = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))

CDEF = """
struct ipsecchan_nlspan { uint32_t offset; uint32_t len; uint16_t type; uint16_t flags;
                          uint32_t seq; uint32_t pid; };
struct ipsecchan_attrspan { uint32_t offset; uint32_t len; uint16_t type; uint16_t flags; };
#define IPSECCHAN_NL_ETRUNC ...
#define IPSECCHAN_NL_ESHORT ...
#define IPSECCHAN_NL_EOVER ...
#define IPSECCHAN_NL_ESPACE ...
int ipsecchan_nl_split(const uint8_t *buf, size_t len, struct ipsecchan_nlspan *out,
                       size_t max_out, size_t *bad_offset);
int ipsecchan_nla_split(const uint8_t *buf, size_t len, struct ipsecchan_attrspan *out,
                        size_t max_out, size_t *bad_offset);

struct nlmsghdr { uint32_t nlmsg_len; uint16_t nlmsg_type; uint16_t nlmsg_flags;
                  uint32_t nlmsg_seq; uint32_t nlmsg_pid; };
struct nlattr { uint16_t nla_len; uint16_t nla_type; };

typedef union { uint32_t a4; uint32_t a6[4]; ...; } xfrm_address_t;
struct xfrm_id { xfrm_address_t daddr; uint32_t spi; uint8_t proto; ...; };
struct xfrm_selector { xfrm_address_t daddr; xfrm_address_t saddr; uint16_t dport;
    uint16_t dport_mask; uint16_t sport; uint16_t sport_mask; uint16_t family;
    uint8_t prefixlen_d; uint8_t prefixlen_s; uint8_t proto; int ifindex; uint32_t user; ...; };
struct xfrm_lifetime_cfg { uint64_t soft_byte_limit; uint64_t hard_byte_limit;
    uint64_t soft_packet_limit; uint64_t hard_packet_limit; uint64_t soft_add_expires_seconds;
    uint64_t hard_add_expires_seconds; uint64_t soft_use_expires_seconds;
    uint64_t hard_use_expires_seconds; ...; };
struct xfrm_lifetime_cur { uint64_t bytes; uint64_t packets; uint64_t add_time;
    uint64_t use_time; ...; };
struct xfrm_stats { uint32_t replay_window; uint32_t replay; uint32_t integrity_failed; ...; };
struct xfrm_usersa_info { struct xfrm_selector sel; struct xfrm_id id; xfrm_address_t saddr;
    struct xfrm_lifetime_cfg lft; struct xfrm_lifetime_cur curlft; struct xfrm_stats stats;
    uint32_t seq; uint32_t reqid; uint16_t family; uint8_t mode; uint8_t replay_window;
    uint8_t flags; ...; };
struct xfrm_userpolicy_info { struct xfrm_selector sel; struct xfrm_lifetime_cfg lft;
    struct xfrm_lifetime_cur curlft; uint32_t priority; uint32_t index; uint8_t dir;
    uint8_t action; uint8_t flags; uint8_t share; ...; };
struct xfrm_user_tmpl { struct xfrm_id id; uint16_t family; xfrm_address_t saddr;
    uint32_t reqid; uint8_t mode; uint8_t share; uint8_t optional; uint32_t aalgos;
    uint32_t ealgos; uint32_t calgos; ...; };
struct xfrm_usersa_id { xfrm_address_t daddr; uint32_t spi; uint16_t family; uint8_t proto;
    ...; };
struct xfrm_userpolicy_id { struct xfrm_selector sel; uint32_t index; uint8_t dir; ...; };
struct xfrm_algo { char alg_name[64]; unsigned int alg_key_len; ...; };
struct xfrm_algo_auth { char alg_name[64]; unsigned int alg_key_len;
    unsigned int alg_trunc_len; ...; };
struct xfrm_algo_aead { char alg_name[64]; unsigned int alg_key_len;
    unsigned int alg_icv_len; ...; };
struct xfrm_encap_tmpl { uint16_t encap_type; uint16_t encap_sport; uint16_t encap_dport;
    xfrm_address_t encap_oa; ...; };
struct xfrm_mark { uint32_t v; uint32_t m; ...; };
struct xfrm_replay_state_esn { unsigned int bmp_len; uint32_t oseq; uint32_t seq;
    uint32_t oseq_hi; uint32_t seq_hi; uint32_t replay_window; ...; };
struct xfrm_user_sec_ctx { uint16_t len; uint16_t exttype; uint8_t ctx_alg; uint8_t ctx_doi;
    uint16_t ctx_len; ...; };

#define XFRM_MSG_NEWSA ...
#define XFRM_MSG_GETSA ...
#define XFRM_MSG_NEWPOLICY ...
#define XFRM_MSG_GETPOLICY ...
#define XFRM_POLICY_IN ...
#define XFRM_POLICY_OUT ...
#define XFRM_POLICY_FWD ...
#define XFRM_POLICY_ALLOW ...
#define XFRM_POLICY_BLOCK ...
#define XFRM_MODE_TRANSPORT ...
#define XFRM_MODE_TUNNEL ...
#define XFRMA_ALG_AUTH ...
#define XFRMA_ALG_CRYPT ...
#define XFRMA_ALG_COMP ...
#define XFRMA_ENCAP ...
#define XFRMA_TMPL ...
#define XFRMA_SEC_CTX ...
#define XFRMA_ALG_AEAD ...
#define XFRMA_ALG_AUTH_TRUNC ...
#define XFRMA_MARK ...
#define XFRMA_REPLAY_ESN_VAL ...
#define XFRMA_IF_ID ...
#define XFRMA_POLICY_TYPE ...
#define IP_XFRM_POLICY ...
#define IPV6_XFRM_POLICY ...
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "ipsecchan._native",
    '#include <netinet/in.h>\n#include <linux/in.h>\n#include <linux/in6.h>\n#include <linux/netlink.h>\n#include <linux/xfrm.h>\n#include "nlmsg.h"\n',
    sources=[os.path.join(HERE, "nlmsg.c")],
    include_dirs=[HERE],
    extra_compile_args=["-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
