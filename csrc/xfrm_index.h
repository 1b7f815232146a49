/* The SAD/SPD index: XFRM netlink messages in, the kernel's lookup answer out.
 *
 * Fed with raw netlink buffers (dump parts or multicast notifications); every length is
 * checked (csrc/nlmsg.c walks the headers and attributes). The answers are those of the
 * reference model, ipsecchan/xfrm/lookup.py (ReferenceIndex), which is the specification.
 *
 * Each SA and policy keeps the lookup fields in compact form plus a copy of its message
 * (SAs without key bytes: algorithm attributes are cut to their fixed part, alg_key_len
 * kept), so that the Python wrapper decodes exactly the record decode_sa/decode_policy gives.
 *
 * Records are named by 64-bit handles: (serial << 32) | slot. A handle goes stale when its
 * record is replaced or removed (the serial changes), so a cache keyed by handle is exact. */
#ifndef IPSECCHAN_XFRM_INDEX_H
#define IPSECCHAN_XFRM_INDEX_H

#include <stddef.h>
#include <stdint.h>

struct ipsecchan_xidx;

enum {
    IPSECCHAN_XIDX_ENOMEM = -100,    /* allocation failed; the index is unchanged */
    IPSECCHAN_XIDX_ENETLINK = -101,  /* a netlink header does not parse: nothing applied */
    IPSECCHAN_XIDX_ESHORT = -102,    /* a message's fixed part is too short */
    IPSECCHAN_XIDX_EATTR = -103,     /* an attribute stream does not parse */
    IPSECCHAN_XIDX_EATTRLEN = -104,  /* a known attribute is shorter than its structure */
    IPSECCHAN_XIDX_ETMPL = -105,     /* XFRMA_TMPL not a whole number of templates */
    IPSECCHAN_XIDX_ESPACE = -106,    /* more messages than the change array holds */
};

/* Verdicts (lookup.py's PROTECTED, BYPASS, BLOCK, NO_POLICY, NO_SA). */
enum {
    IPSECCHAN_XIDX_PROTECTED = 0,
    IPSECCHAN_XIDX_BYPASS = 1,
    IPSECCHAN_XIDX_BLOCK = 2,
    IPSECCHAN_XIDX_NO_POLICY = 3,
    IPSECCHAN_XIDX_NO_SA = 4,
};

#define IPSECCHAN_XIDX_DEFAULT_IN_BLOCK 1u
#define IPSECCHAN_XIDX_DEFAULT_OUT_BLOCK 2u
/* Policy "handle" meaning: the per-socket policy passed to the lookup. 0: no policy. */
#define IPSECCHAN_XIDX_SOCKET_POLICY 1u

struct ipsecchan_xidx *ipsecchan_xidx_new(void);
void ipsecchan_xidx_free(struct ipsecchan_xidx *idx);
void ipsecchan_xidx_clear(struct ipsecchan_xidx *idx);

/* Apply a buffer of netlink messages. now: wall-clock seconds, for the soft add-time limit.
 * Returns how many messages of the handled types were applied (ReferenceIndex.apply's
 * count), or a negative IPSECCHAN_XIDX_E* code; then *bad_offset is the byte offset of the
 * offending header or attribute and *applied how many messages before it were applied (a
 * rejected message changes nothing; a header error rejects the whole buffer). */
int64_t ipsecchan_xidx_apply(struct ipsecchan_xidx *idx, const uint8_t *buf, size_t len,
                             double now, size_t *bad_offset, int64_t *applied);

/* What one message of a buffer did, for a caller that follows the notifications without
 * decoding them itself. Every message gets one, whatever its type (offset, len: the whole
 * netlink message within the buffer). SA messages (NEWSA, UPDSA, DELSA, EXPIRE) name the SA
 * by family, dst, proto, spi, with its source address when known (has_src); handle: the
 * record the message stored or marked dying; old_handle: the record it replaced or removed.
 * FLUSHSA: proto. EXPIRE, POLEXPIRE: hard. Addresses are as in the message (network
 * order, an IPv4 address in the first four bytes). */
struct ipsecchan_xidx_change {
    uint64_t handle, old_handle;
    uint32_t offset, len;
    uint32_t spi;                    /* host order */
    uint16_t type, family;
    uint8_t proto, hard, has_src;
    uint8_t unwatched;               /* the SA changed is one the watch cannot place (below) */
    char dst[16], src[16];
};

/* ipsecchan_xidx_apply, also filling changes[0..*nchanges) (one per message; more messages
 * than changes_cap: IPSECCHAN_XIDX_ESPACE and nothing applied; len / 16 + 1 always suffices).
 * On a rejected message, *nchanges counts the messages applied (or skipped) before it. */
int64_t ipsecchan_xidx_apply_report(struct ipsecchan_xidx *idx, const uint8_t *buf,
                                    size_t len, double now, size_t *bad_offset,
                                    int64_t *applied, struct ipsecchan_xidx_change *changes,
                                    size_t changes_cap, size_t *nchanges);

/* The fields of an SA that latching reads, without decoding its message. sel_other: its
 * selector names addresses other than the SA's own two (a tunnel's inner addresses); a
 * wildcard (family 0) or the SA's own host pair does not. prot gets the protection key: the
 * algorithm attributes as stored (their fixed parts: name and lengths, never key bytes);
 * prot_len is its full length (written only if it fits prot_cap). Returns 0, or -1 for a
 * stale handle. */
struct ipsecchan_xidx_sainfo {
    uint64_t add_time;
    uint32_t spi, reqid;             /* host order */
    uint32_t prot_len;
    uint16_t family;
    uint8_t proto, mode, flags, dying, encap, sel_other;
    char dst[16], src[16];
};
int64_t ipsecchan_xidx_sa_info(const struct ipsecchan_xidx *idx, uint64_t handle,
                               struct ipsecchan_xidx_sainfo *out, uint8_t *prot,
                               size_t prot_cap);

size_t ipsecchan_xidx_memory(const struct ipsecchan_xidx *idx);
size_t ipsecchan_xidx_sa_count(const struct ipsecchan_xidx *idx);
size_t ipsecchan_xidx_policy_count(const struct ipsecchan_xidx *idx);

/* Handles of every SA in insertion order (up to max); returns the count. */
size_t ipsecchan_xidx_sa_handles(const struct ipsecchan_xidx *idx, uint64_t *out, size_t max);
size_t ipsecchan_xidx_policy_handles(const struct ipsecchan_xidx *idx, uint64_t *out,
                                     size_t max);
/* The stored message (payload) of a record; NULL for a stale handle. */
const uint8_t *ipsecchan_xidx_sa_message(const struct ipsecchan_xidx *idx, uint64_t handle,
                                         size_t *len);
const uint8_t *ipsecchan_xidx_policy_message(const struct ipsecchan_xidx *idx,
                                             uint64_t handle, size_t *len);

/* The lookup. Addresses are 16-byte big-endian integers (an IPv4 address in the last four
 * bytes), as lookup.py's _addr_int gives them. sock_out/sock_in: a per-socket policy as an
 * XFRM_MSG_NEWPOLICY payload, or NULL. out receives, for OUT then IN:
 *   verdict, policy handle (0 none, 1 the socket policy), flags (1 per-socket,
 *   2 cleartext accepted), n, then n SA handles.
 * Returns the number of words the answer takes (when more than out_cap, out holds only the
 * first out_cap; call again with room), or a negative code for a malformed socket policy. */
int64_t ipsecchan_xidx_lookup(const struct ipsecchan_xidx *idx, uint16_t family,
                              uint8_t proto, const char *local, uint16_t local_port,
                              const char *remote, uint16_t remote_port, uint32_t mark,
                              int32_t ifindex, uint32_t if_id,
                              const char *sock_out, size_t sock_out_len,
                              const char *sock_in, size_t sock_in_len,
                              unsigned defaults, uint64_t *out, size_t out_cap);

/* The same without per-socket policies (fewer arguments: the wrapper's common case). */
int64_t ipsecchan_xidx_lookup_flow(const struct ipsecchan_xidx *idx, uint16_t family,
                                   uint8_t proto, const char *local, uint16_t local_port,
                                   const char *remote, uint16_t remote_port, uint32_t mark,
                                   int32_t ifindex, uint32_t if_id, unsigned defaults,
                                   uint64_t *out, size_t out_cap);

/* For benchmarks: the lookup of each flow, `rounds` times, timed one by one in C
 * (CLOCK_MONOTONIC); ns_out gets nflows * rounds durations. Returns the total number of
 * answer words (to keep the work observable), or a negative code. */
struct ipsecchan_xidx_flow {
    char local[16], remote[16];
    uint32_t mark, if_id;
    int32_t ifindex;
    uint16_t family, local_port, remote_port;
    uint8_t proto;
};
int64_t ipsecchan_xidx_bench(const struct ipsecchan_xidx *idx,
                             const struct ipsecchan_xidx_flow *flows, size_t nflows,
                             size_t rounds, unsigned defaults, uint64_t *ns_out);

/* Class tags: a label the caller puts on an SA record (0: none). Latching labels each SA it
 * has identified with the class of its identities and protection; a record replaced or
 * removed loses its label with its handle. set_tag: -1 for a stale handle or a tag above
 * TAG_MAX (tags take 16 bits of the record). */
#define IPSECCHAN_XIDX_TAG_MAX 0xFFFFu
int64_t ipsecchan_xidx_sa_set_tag(struct ipsecchan_xidx *idx, uint64_t handle, uint32_t tag);
uint32_t ipsecchan_xidx_sa_tag(const struct ipsecchan_xidx *idx, uint64_t handle);
void ipsecchan_xidx_clear_tags(struct ipsecchan_xidx *idx);

/* Followed flows: per slot, a flow, the class tag its SAs must all carry, and the keys of
 * the SAs carrying it now (family, dst as 16 big-endian bytes of the address as the index
 * holds it, proto, spi; reqid: the OUT SA's). revalidate looks each given slot's flow up
 * and answers, per slot:
 *   KEEP     one OUT SA and 1..FOLLOW_IN IN SAs, protected both ways, no cleartext
 *            accepted, every SA of the flow's class, and the same keys as followed;
 *   MOVED    so, on another OUT SA (or reqid): the slot now follows the new keys;
 *   INBOUND  so, only the IN SAs changed: likewise;
 *   NEED     so far so, but some SAs carry no tag yet: the caller identifies them (their
 *            handles are given) and asks again;
 *   SLOW     anything else (another class, other verdicts, bundles, a slot not followed):
 *            the caller's full judgement.
 * MOVED and INBOUND give the handles of the OUT SA then the IN SAs; NEED those untagged. */
/* Watched flows: the caller names, per slot (one per latch), the peer address of a flow
 * (family, 16 big-endian bytes as the flow's); every SA change applied from then on marks
 * the slots whose peer is either end of the SA or lies within its selector (a tunnel's
 * inner addresses; after more than a few such selectors before a take, every slot). A
 * change the watch cannot place (an SA other than transport between two given hosts: a
 * tunnel's names its gateways, a wildcard-source inbound SA any peer) is flagged in its
 * report (change.unwatched); an SA flush or clear marks every slot. watch: 0, ESPACE for an
 * unknown family or an absurd slot, ENOMEM. take_touched: the slots marked since the last
 * take (each once) into out, their number; -1 for every slot (also when more than cap). */
int64_t ipsecchan_xidx_watch(struct ipsecchan_xidx *idx, uint32_t slot, uint16_t family,
                             const char *addr);
void ipsecchan_xidx_unwatch(struct ipsecchan_xidx *idx, uint32_t slot);
int64_t ipsecchan_xidx_take_touched(struct ipsecchan_xidx *idx, uint32_t *out, size_t cap);
size_t ipsecchan_xidx_watch_memory(const struct ipsecchan_xidx *idx);

#define IPSECCHAN_XIDX_FOLLOW_IN 3
enum { IPSECCHAN_XIDX_KEEP = 0, IPSECCHAN_XIDX_MOVED = 1, IPSECCHAN_XIDX_INBOUND = 2,
       IPSECCHAN_XIDX_NEED = 3, IPSECCHAN_XIDX_SLOW = 4 };
struct ipsecchan_xidx_sakey {
    char dst[16];
    uint32_t spi, reqid;
    uint16_t family;
    uint8_t proto, pad;
};
struct ipsecchan_xidx_follow {
    struct ipsecchan_xidx_flow flow;
    uint32_t tag, nin;
    struct ipsecchan_xidx_sakey out, in[IPSECCHAN_XIDX_FOLLOW_IN];
};
struct ipsecchan_xfollow;
struct ipsecchan_xfollow *ipsecchan_xfollow_new(void);
void ipsecchan_xfollow_free(struct ipsecchan_xfollow *t);
size_t ipsecchan_xfollow_memory(const struct ipsecchan_xfollow *t);
/* ENOMEM, or ESPACE for nin > FOLLOW_IN or an absurd slot; 0 done. */
int64_t ipsecchan_xfollow_set(struct ipsecchan_xfollow *t, uint32_t slot,
                              const struct ipsecchan_xidx_follow *f);
int64_t ipsecchan_xfollow_get(const struct ipsecchan_xfollow *t, uint32_t slot,
                              struct ipsecchan_xidx_follow *out);
void ipsecchan_xfollow_drop(struct ipsecchan_xfollow *t, uint32_t slot);
/* Per slot i: codes[i], and nsas[i] handles at handles[i * (1 + FOLLOW_IN)] (room for
 * n * (1 + FOLLOW_IN) handles). Returns 0. */
int64_t ipsecchan_xfollow_revalidate(struct ipsecchan_xfollow *t,
                                     const struct ipsecchan_xidx *idx, const uint32_t *slots,
                                     size_t n, unsigned defaults, uint8_t *codes,
                                     uint8_t *nsas, uint64_t *handles);
/* set_tag for n records at once; done[i]: 1 set, 0 stale handle. */
void ipsecchan_xidx_set_tags(struct ipsecchan_xidx *idx, const uint64_t *handles,
                             const uint32_t *tags, size_t n, uint8_t *done);

#endif
