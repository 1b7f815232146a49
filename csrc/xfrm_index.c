/* The SAD/SPD index (see xfrm_index.h; the specification is ipsecchan/xfrm/lookup.py).
 *
 * Addresses are compared as lookup.py compares them: as integers (IPv4 the low 32 bits of
 * a 128-bit value, IPv6 all of it), and an address of a family that is neither AF_INET nor
 * AF_INET6 compares as 0 ("cmpv").
 *
 * Layout: each record is one block: a compact header holding every field a lookup checks
 * (the chain links, addresses, SPI, reqid, mark, if_id, a selector summary; for policies the
 * selector and the first template, decoded), then the stored message. A lookup reads the
 * header only (about 100 bytes for an SA); the message is read to hand the record out, for
 * templates after the first, for the add time of competing OUT SAs and for an SA selector
 * that is not all-wildcard. The OUT and IN paths are interleaved with prefetches, one level
 * of the dependency chain at a time (buckets, records), so that their cache misses overlap.
 *
 * SAs: four hash tables with doubly linked chains through 32-bit slot numbers:
 *   KEY  (family, dst, proto, spi)          update, delete, IN lookups with a template SPI
 *   OUT  (family, reqid, proto, mode, dst)  OUT lookups: every candidate of a template
 *   INR  (dst, proto, mode, reqid)          IN lookups with a template reqid
 *   IN   (dst, proto, mode)                 IN lookups with neither SPI nor reqid
 * Policies: KEY (dir, index), and tuple-space search for the lookup: one hash table keyed by
 * (dir, family, prefix lengths, the selector's addresses under those prefixes), chained
 * through pointers (no slot indirection) with at least two buckets per policy; a lookup
 * probes one chain per prefix-length class present (host-to-host selectors are one class)
 * and takes the lowest (priority, index) among the matches. Ports, protocol, ifindex, mark
 * and if_id are checked on the chain. */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <linux/ipsec.h>
#include <linux/netlink.h>
#include <linux/xfrm.h>

#include "nlmsg.h"
#include "xfrm_index.h"

typedef unsigned __int128 u128;

#define NIL UINT32_MAX
#define ALIGN4(n) (((n) + 3u) & ~(size_t)3u)
#define XFRMA_SA_DIR_NUM 40          /* Linux 6.10; Debian 12's header lacks it */
#define STATE_WILDRECV 8             /* XFRM_STATE_WILDRECV */
#define INF UINT64_MAX
#define MIN_BUCKETS 64u
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)

struct link { uint32_t next, prev; };

/* The part of every record the slot store handles. */
struct hdr {
    struct link lk[4];
    uint32_t serial, msg_len;
};

/* SA summary bits */
#define SEL_OUT_ANY 1u               /* sel.family == 0: matches every OUT flow */
#define SEL_IN_ANY 2u                /* no mask, prefix, proto or ifindex: matches every flow */
#define SA_DYING 4u                  /* soft-expired: ranked after the others for OUT */

struct xsa {
    struct hdr h;
    uint32_t seq;                    /* insertion order (renumbered if it would wrap) */
    uint32_t spi;                    /* host order */
    u128 dst;                        /* as the SA's family decodes them (raw if neither) */
    u128 src;
    uint32_t reqid, mark_v, mark_m, if_id;
    uint16_t family;
    uint8_t proto, mode, flags, bits;    /* bits: SEL_*, SA_DYING */
    uint16_t tag;                    /* the caller's class label (0: none), see sa_set_tag */
    alignas(8) uint8_t msg[];        /* xfrm_usersa_info + attributes, keys cut off */
};

/* A template, decoded. */
struct tmplc {
    u128 dst, src;
    uint32_t spi, reqid;
    uint16_t family;
    uint8_t proto, mode, optional;
};

struct xpol {
    struct hdr h;
    uint64_t key;                    /* (priority << 32) | index */
    uint32_t mark_v, mark_m;
    u128 s, d;                       /* selector addresses */
    uint32_t if_id;
    int32_t ifindex;                 /* the selector's */
    uint16_t sport, sport_mask, dport, dport_mask;   /* the selector's, host order */
    uint32_t tmpl_off, ntmpl;
    uint16_t family;
    uint8_t dir, action, ps, pd;     /* ps, pd: prefix lengths, at most the family's bits */
    uint8_t sproto;                  /* the selector's L4 protocol */
    uint32_t slot;
    struct xpol *tnext, *tprev;      /* the TSS chain (pointers: no slot indirection) */
    struct tmplc t0;                 /* the first template (if ntmpl) */
    alignas(16) uint8_t msg[];       /* xfrm_userpolicy_info + attributes, as received */
};

#define SA_HDR offsetof(struct xsa, msg)
#define POL_HDR offsetof(struct xpol, msg)
_Static_assert(offsetof(struct xsa, msg) == 104, "SA header: 104 bytes");

enum { T_KEY, T_OUT, T_INR, T_IN };
enum { P_KEY, P_TSS };

struct table { uint32_t *heads; };

struct store {
    struct hdr **v;
    uint32_t cap, top, n;            /* slots allocated, slots ever used, live entries */
    uint32_t *free_;
    uint32_t nfree;
    uint32_t nb;                     /* buckets per table (power of two) */
    int ntab;
    unsigned hot;                    /* header bytes a lookup reads */
    struct table t[4];
};

struct cls { uint16_t family; uint8_t ps, pd; uint32_t count; uint64_t minkey; };
struct clist { struct cls *v; uint32_t n, cap; };

/* Watched flows (one per latch, by the caller's slot): an SA change marks the slots whose
 * peer address it names (either end of the SA, or within a tunnel SA's selector), so that
 * the caller learns which latches a burst of notifications touched without an event per
 * notification. */
struct wslot {
    u128 addr;                       /* the peer, as norm() gives it */
    uint32_t next, prev;             /* the bucket's chain (NIL ends) */
    uint16_t family;
    uint8_t used, touched;
};

struct watch {
    struct wslot *v;
    uint32_t cap, n;                 /* slots allocated, slots watched */
    uint32_t *heads, nb;             /* buckets by peer (a power of two, or none yet) */
    uint32_t *touched, ntouched;     /* slots marked since the last take, each once */
    uint32_t scans;                  /* selector scans since the last take */
    int all;                         /* every slot counts as touched */
};

struct ipsecchan_xidx {
    struct store sa, pol;
    struct watch w;
    struct xpol **tss;               /* TSS buckets: tss_nb >= 2 x policies in it */
    uint32_t tss_nb, tss_n;
    struct clist cls[2];             /* prefix-length classes of dir in (0) and out (1) */
    uint32_t seq;
    uint32_t serial;
    size_t mem;
};

static inline struct hdr *rec(const struct store *s, uint32_t slot) { return s->v[slot]; }
static inline int dying(const struct xsa *e) { return (e->bits & SA_DYING) != 0; }

static inline struct xsa *sa_rec(const struct ipsecchan_xidx *x, uint32_t slot)
{
    return (struct xsa *)x->sa.v[slot];
}

static inline struct xpol *pol_rec(const struct ipsecchan_xidx *x, uint32_t slot)
{
    return (struct xpol *)x->pol.v[slot];
}

/* ---- memory, counted ---- */

static void *xmalloc(struct ipsecchan_xidx *x, size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p)
        x->mem += malloc_usable_size(p) + sizeof(size_t);
    return p;
}

static void xfree(struct ipsecchan_xidx *x, void *p)
{
    if (p) {
        x->mem -= malloc_usable_size(p) + sizeof(size_t);
        free(p);
    }
}

static void *xrealloc(struct ipsecchan_xidx *x, void *p, size_t n)
{
    size_t old = p ? malloc_usable_size(p) + sizeof(size_t) : 0;
    void *q = realloc(p, n ? n : 1);
    if (q)
        x->mem = x->mem - old + malloc_usable_size(q) + sizeof(size_t);
    return q;
}

/* ---- addresses and hashing ---- */

static inline int famok(uint16_t f) { return f == AF_INET || f == AF_INET6; }

static inline u128 load_be(const uint8_t *p, int n)
{
    u128 v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static inline u128 load_be16(const uint8_t *p)
{
    uint64_t hi, lo;
    memcpy(&hi, p, 8);
    memcpy(&lo, p + 8, 8);
    return ((u128)__builtin_bswap64(hi) << 64) | __builtin_bswap64(lo);
}

/* An address as lookup.py's records hold it: decoded in its own family. */
static inline u128 norm(uint16_t fam, const xfrm_address_t *a)
{
    const uint8_t *p = (const uint8_t *)a;
    return fam == AF_INET ? load_be(p, 4) : load_be16(p);
}

/* The value _addr_int(fam, text) compares. */
static inline u128 cmpv(uint16_t fam, u128 v) { return famok(fam) ? v : 0; }

static inline uint64_t mix(uint64_t h, uint64_t v)
{
    h ^= v + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 31);
}

static inline uint64_t mix128(uint64_t h, u128 v)
{
    return mix(mix(h, (uint64_t)v), (uint64_t)(v >> 64));
}

static inline uint64_t h_key(uint16_t fam, u128 dst, uint8_t proto, uint32_t spi)
{
    return mix128(mix(1, ((uint64_t)fam << 40) | ((uint64_t)proto << 32) | spi), dst);
}

static inline uint64_t h_out(uint16_t fam, uint32_t reqid, uint8_t proto, uint8_t mode,
                             u128 dst)
{
    return mix128(mix(2, ((uint64_t)fam << 48) | ((uint64_t)proto << 40) |
                         ((uint64_t)mode << 32) | reqid), dst);
}

static inline uint64_t h_inr(u128 dst, uint8_t proto, uint8_t mode, uint32_t reqid)
{
    return mix128(mix(3, ((uint64_t)proto << 40) | ((uint64_t)mode << 32) | reqid), dst);
}

static inline uint64_t h_in(u128 dst, uint8_t proto, uint8_t mode)
{
    return mix128(mix(4, ((uint64_t)proto << 8) | mode), dst);
}

static inline uint64_t h_pkey(uint8_t dir, uint32_t index)
{
    return mix(5, ((uint64_t)dir << 32) | index);
}

static inline unsigned fam_bits(uint16_t fam) { return fam == AF_INET ? 32 : 128; }

static inline u128 prefix_of(u128 a, unsigned bits, unsigned plen)
{
    return plen == 0 ? 0 : a >> (bits - plen);
}

static inline uint64_t h_tss(uint8_t dir, uint16_t fam, uint8_t ps, uint8_t pd, u128 s, u128 d)
{
    return mix128(mix128(mix(6, ((uint64_t)dir << 32) | ((uint64_t)fam << 16) |
                                ((uint64_t)ps << 8) | pd), s), d);
}

#define SAI(e) ((const struct xfrm_usersa_info *)(const void *)(e)->msg)

static uint64_t sa_hash(const struct xsa *e, int t)
{
    u128 d = cmpv(e->family, e->dst);
    switch (t) {
    case T_KEY: return h_key(e->family, e->dst, e->proto, e->spi);
    case T_OUT: return h_out(e->family, e->reqid, e->proto, e->mode, d);
    case T_INR: return h_inr(d, e->proto, e->mode, e->reqid);
    default: return h_in(d, e->proto, e->mode);
    }
}

static inline int pol_in_tss(const struct xpol *p) { return p->dir < 2; }

static inline u128 tss_addr(uint16_t fam, u128 a, unsigned plen)
{
    return famok(fam) ? prefix_of(a, fam_bits(fam), plen) : 0;
}

static uint64_t pol_hash(const struct xpol *p, int t)
{
    if (t == P_KEY)
        return h_pkey(p->dir, (uint32_t)p->key);
    return h_tss(p->dir, p->family, p->ps, p->pd, tss_addr(p->family, p->s, p->ps),
                 tss_addr(p->family, p->d, p->pd));
}

static uint64_t entry_hash(const struct store *s, const struct ipsecchan_xidx *x,
                           const struct hdr *e, int t)
{
    return s == &x->sa ? sa_hash((const struct xsa *)e, t)
                       : pol_hash((const struct xpol *)e, t);
}

static int in_table(const struct store *s, const struct ipsecchan_xidx *x,
                    const struct hdr *e, int t)
{
    (void)s, (void)x, (void)e, (void)t;
    return 1;                        /* the policies' TSS table is kept apart */
}

/* ---- the slot store and its chained tables ---- */

static void link_in(struct store *s, uint32_t slot, int t, uint64_t h)
{
    uint32_t b = (uint32_t)(h & (s->nb - 1));
    struct hdr *e = rec(s, slot);
    e->lk[t].prev = NIL;
    e->lk[t].next = s->t[t].heads[b];
    if (e->lk[t].next != NIL)
        rec(s, e->lk[t].next)->lk[t].prev = slot;
    s->t[t].heads[b] = slot;
}

static void unlink_from(struct ipsecchan_xidx *x, struct store *s, uint32_t slot, int t)
{
    struct hdr *e = rec(s, slot);
    if (!in_table(s, x, e, t))
        return;
    if (e->lk[t].prev == NIL)
        s->t[t].heads[entry_hash(s, x, e, t) & (s->nb - 1)] = e->lk[t].next;
    else
        rec(s, e->lk[t].prev)->lk[t].next = e->lk[t].next;
    if (e->lk[t].next != NIL)
        rec(s, e->lk[t].next)->lk[t].prev = e->lk[t].prev;
}

static void store_release(struct ipsecchan_xidx *x, struct store *s)
{
    for (uint32_t i = 0; i < s->top; i++)
        xfree(x, s->v[i]);
    xfree(x, s->v);
    xfree(x, s->free_);
    for (int t = 0; t < s->ntab; t++)
        xfree(x, s->t[t].heads);
    int ntab = s->ntab;
    unsigned hot = s->hot;
    memset(s, 0, sizeof *s);
    s->ntab = ntab;
    s->hot = hot;
}

static int store_init(struct ipsecchan_xidx *x, struct store *s)
{
    s->nb = MIN_BUCKETS;
    for (int t = 0; t < s->ntab; t++) {
        s->t[t].heads = xmalloc(x, s->nb * sizeof(uint32_t));
        if (!s->t[t].heads)
            return -1;
        memset(s->t[t].heads, 0xff, s->nb * sizeof(uint32_t));
    }
    return 0;
}

/* Room for one more entry: a free slot and enough buckets. Changes nothing visible. */
static int store_reserve(struct ipsecchan_xidx *x, struct store *s)
{
    if (!s->nfree && s->top == s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 64;
        struct hdr **v = xrealloc(x, s->v, (size_t)cap * sizeof *v);
        if (!v)
            return -1;
        s->v = v;
        uint32_t *f = xrealloc(x, s->free_, (size_t)cap * sizeof *f);
        if (!f)
            return -1;
        s->free_ = f;
        s->cap = cap;
    }
    if (s->n + 1 > s->nb) {
        uint32_t nb = s->nb * 2;
        uint32_t *heads[4];
        for (int t = 0; t < s->ntab; t++) {
            heads[t] = xmalloc(x, (size_t)nb * sizeof(uint32_t));
            if (!heads[t]) {
                while (t--)
                    xfree(x, heads[t]);
                return -1;
            }
            memset(heads[t], 0xff, (size_t)nb * sizeof(uint32_t));
        }
        for (int t = 0; t < s->ntab; t++) {
            xfree(x, s->t[t].heads);
            s->t[t].heads = heads[t];
        }
        s->nb = nb;
        for (uint32_t i = 0; i < s->top; i++)
            if (s->v[i])
                for (int t = 0; t < s->ntab; t++)
                    if (in_table(s, x, s->v[i], t))
                        link_in(s, i, t, entry_hash(s, x, s->v[i], t));
    }
    return 0;
}

static uint32_t store_take_slot(struct store *s)
{
    return s->nfree ? s->free_[--s->nfree] : s->top++;
}

static void store_link_all(struct ipsecchan_xidx *x, struct store *s, uint32_t slot)
{
    for (int t = 0; t < s->ntab; t++)
        if (in_table(s, x, s->v[slot], t))
            link_in(s, slot, t, entry_hash(s, x, s->v[slot], t));
}

static void store_unlink_all(struct ipsecchan_xidx *x, struct store *s, uint32_t slot)
{
    for (int t = 0; t < s->ntab; t++)
        unlink_from(x, s, slot, t);
}

static void store_drop(struct ipsecchan_xidx *x, struct store *s, uint32_t slot)
{
    store_unlink_all(x, s, slot);
    xfree(x, s->v[slot]);
    s->v[slot] = NULL;
    s->free_[s->nfree++] = slot;
    s->n--;
}

static uint32_t next_serial(struct ipsecchan_xidx *x)
{
    if (++x->serial == 0)
        x->serial = 1;
    return x->serial;
}

static inline uint64_t handle_of(uint32_t serial, uint32_t slot)
{
    return ((uint64_t)serial << 32) | slot;
}

/* ---- attribute checks (as messages.py's _Attrs) ---- */

struct attrs {
    uint32_t mark_v, mark_m, if_id;
    const uint8_t *tmpl;
    size_t tmpl_len;
    int has_tmpl;
};

#define STACK_SPANS 32

/* Split an attribute stream; *spans is stack or malloc'd (caller frees if != stack). */
static int split_attrs(const uint8_t *p, size_t len, struct ipsecchan_attrspan *stack,
                       struct ipsecchan_attrspan **spans, size_t *bad)
{
    size_t cap = len / sizeof(struct nlattr) + 1;
    struct ipsecchan_attrspan *s = cap <= STACK_SPANS ? stack : malloc(cap * sizeof *s);
    if (!s)
        return IPSECCHAN_XIDX_ENOMEM;
    int n = ipsecchan_nla_split(p, len, s, cap, bad);
    if (n < 0) {
        if (s != stack)
            free(s);
        return IPSECCHAN_XIDX_EATTR;
    }
    *spans = s;
    return n;
}

static size_t algo_fixed(uint16_t type)
{
    switch (type) {
    case XFRMA_ALG_AEAD: return sizeof(struct xfrm_algo_aead);
    case XFRMA_ALG_CRYPT: case XFRMA_ALG_AUTH: case XFRMA_ALG_COMP:
        return sizeof(struct xfrm_algo);
    case XFRMA_ALG_AUTH_TRUNC: return sizeof(struct xfrm_algo_auth);
    default: return 0;
    }
}

static int check_attr(uint16_t type, const uint8_t *v, size_t n, struct attrs *a)
{
    size_t need = algo_fixed(type);
    if (need)
        return n >= need ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    switch (type) {
    case XFRMA_ENCAP:
        return n >= sizeof(struct xfrm_encap_tmpl) ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    case XFRMA_MARK: {
        struct xfrm_mark m;
        if (n < sizeof m)
            return IPSECCHAN_XIDX_EATTRLEN;
        memcpy(&m, v, sizeof m);
        a->mark_v = m.v;
        a->mark_m = m.m;
        return 0;
    }
    case XFRMA_IF_ID:
        if (n < 4)
            return IPSECCHAN_XIDX_EATTRLEN;
        memcpy(&a->if_id, v, 4);
        return 0;
    case XFRMA_REPLAY_ESN_VAL:
        return n >= sizeof(struct xfrm_replay_state_esn) ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    case XFRMA_REPLAY_VAL:
        return n >= sizeof(struct xfrm_replay_state) ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    case XFRMA_SA_DIR_NUM:
        return n >= 1 ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    case XFRMA_SEC_CTX: {
        struct xfrm_user_sec_ctx c;
        if (n < sizeof c)
            return IPSECCHAN_XIDX_EATTRLEN;
        memcpy(&c, v, sizeof c);
        return n >= sizeof c + c.ctx_len ? 0 : IPSECCHAN_XIDX_EATTRLEN;
    }
    case XFRMA_TMPL:
        a->tmpl = v;
        a->tmpl_len = n;
        a->has_tmpl = 1;
        return 0;
    default:
        return 0;
    }
}

/* Check the attributes of a record (tail at buffer offset base). skip: index of a span not
 * to check (the embedded record of a delete notification), or -1. */
static int check_spans(const uint8_t *tail, const struct ipsecchan_attrspan *sp, int n,
                       int skip, size_t base, int policy, struct attrs *a, size_t *bad)
{
    memset(a, 0, sizeof *a);
    for (int i = 0; i < n; i++) {
        if (i == skip)
            continue;
        int r = check_attr(sp[i].type, tail + sp[i].offset, sp[i].len, a);
        if (r) {
            *bad = base + sp[i].offset - sizeof(struct nlattr);
            return r;
        }
    }
    /* decode_policy reads the templates; decode_sa leaves XFRMA_TMPL alone */
    if (policy && a->tmpl_len % sizeof(struct xfrm_user_tmpl)) {
        *bad = base;
        return IPSECCHAN_XIDX_ETMPL;
    }
    return 0;
}

/* ---- SAs ---- */

static int sa_key_find(const struct ipsecchan_xidx *x, uint16_t fam, u128 dst, uint8_t proto,
                       uint32_t spi, uint32_t *slot)
{
    const struct store *s = &x->sa;
    uint32_t i = s->t[T_KEY].heads[h_key(fam, dst, proto, spi) & (s->nb - 1)];
    for (; i != NIL; i = sa_rec(x, i)->h.lk[T_KEY].next) {
        const struct xsa *e = sa_rec(x, i);
        if (e->family == fam && e->dst == dst && e->proto == proto && e->spi == spi) {
            *slot = i;
            return 1;
        }
    }
    return 0;
}

static int soft_expired(const struct xfrm_usersa_info *i, double now)
{
    const struct xfrm_lifetime_cfg *l = &i->lft;
    if (l->soft_byte_limit != INF && i->curlft.bytes >= l->soft_byte_limit)
        return 1;
    if (l->soft_packet_limit != INF && i->curlft.packets >= l->soft_packet_limit)
        return 1;
    uint64_t s = l->soft_add_expires_seconds;
    if (s > 0 && s != INF && i->curlft.add_time) {
        u128 lim = (u128)i->curlft.add_time + s;
        if (!(now >= 0))
            return 0;                         /* negative or NaN */
        if (now >= 36893488147419103232.0)    /* 2**65 > any lim */
            return 1;
        return (u128)now >= lim;              /* lim is whole: now >= lim iff floor(now) >= lim */
    }
    return 0;
}

/* Build (not insert) the SA of a NEWSA/UPDSA payload. */
static int sa_build(struct ipsecchan_xidx *x, const uint8_t *pl, size_t len, size_t off,
                    struct xsa **out, size_t *bad)
{
    const size_t fixed = sizeof(struct xfrm_usersa_info);
    if (len < fixed) {
        *bad = off;
        return IPSECCHAN_XIDX_ESHORT;
    }
    size_t toff = ALIGN4(fixed) < len ? ALIGN4(fixed) : len;
    struct ipsecchan_attrspan stack[STACK_SPANS], *sp;
    size_t b;
    int n = split_attrs(pl + toff, len - toff, stack, &sp, &b);
    if (n < 0) {
        *bad = off + toff + b;
        return n;
    }
    struct attrs a;
    int r = check_spans(pl + toff, sp, n, -1, off + toff, 0, &a, bad);
    if (r)
        goto done;
    size_t mlen = ALIGN4(fixed);
    for (int i = 0; i < n; i++) {
        size_t cut = algo_fixed(sp[i].type);
        mlen += ALIGN4(sizeof(struct nlattr) + (cut ? cut : sp[i].len));
    }
    struct xsa *e = xmalloc(x, SA_HDR + mlen);
    if (!e) {
        r = IPSECCHAN_XIDX_ENOMEM;
        goto done;
    }
    memset(e, 0, SA_HDR);
    uint8_t *m = e->msg;
    memcpy(m, pl, fixed);
    size_t w = fixed;
    memset(m + w, 0, ALIGN4(fixed) - w);
    w = ALIGN4(fixed);
    for (int i = 0; i < n; i++) {
        size_t cut = algo_fixed(sp[i].type);
        size_t vlen = cut ? cut : sp[i].len;
        struct nlattr h;
        memcpy(&h, pl + toff + sp[i].offset - sizeof h, sizeof h);
        h.nla_len = (uint16_t)(sizeof h + vlen);
        memcpy(m + w, &h, sizeof h);
        memcpy(m + w + sizeof h, pl + toff + sp[i].offset, vlen);
        memset(m + w + sizeof h + vlen, 0, ALIGN4(sizeof h + vlen) - (sizeof h + vlen));
        w += ALIGN4(sizeof h + vlen);
    }
    e->h.msg_len = (uint32_t)mlen;
    struct xfrm_usersa_info in;
    memcpy(&in, pl, sizeof in);
    e->family = in.family;
    e->dst = norm(in.family, &in.id.daddr);
    e->src = norm(in.family, &in.saddr);
    e->spi = ntohl(in.id.spi);
    e->reqid = in.reqid;
    e->proto = in.id.proto;
    e->mode = in.mode;
    e->flags = in.flags;
    e->mark_v = a.mark_v;
    e->mark_m = a.mark_m;
    e->if_id = a.if_id;
    const struct xfrm_selector *sel = &in.sel;
    e->bits = (sel->family == 0 ? SEL_OUT_ANY : 0) |
        (!sel->dport_mask && !sel->sport_mask && !sel->proto && !sel->ifindex &&
         !sel->prefixlen_d && !sel->prefixlen_s ? SEL_IN_ANY : 0);
    *out = e;
done:
    if (sp != stack)
        free(sp);
    return r;
}

static int by_slot_seq(const void *a, const void *b, void *ctx)
{
    const struct store *s = ctx;
    uint32_t x = ((const struct xsa *)s->v[*(const uint32_t *)a])->seq;
    uint32_t y = ((const struct xsa *)s->v[*(const uint32_t *)b])->seq;
    return x < y ? -1 : x > y;
}

/* The 32-bit sequence numbers would wrap: number the SAs 1..n in their order. */
static int renumber(struct ipsecchan_xidx *x)
{
    struct store *s = &x->sa;
    uint32_t *v = malloc(((size_t)s->n + 1) * sizeof *v), n = 0;
    if (!v)
        return -1;
    for (uint32_t i = 0; i < s->top; i++)
        if (s->v[i])
            v[n++] = i;
    qsort_r(v, n, sizeof *v, by_slot_seq, s);
    for (uint32_t i = 0; i < n; i++)
        ((struct xsa *)s->v[v[i]])->seq = i + 1;
    x->seq = n;
    free(v);
    return 0;
}

static void watch_sa(struct ipsecchan_xidx *x, const struct xsa *e,
                     struct ipsecchan_xidx_change *c);
static void watch_all(struct ipsecchan_xidx *x);
static int sel_other(const struct xfrm_usersa_info *in);

static int sa_put(struct ipsecchan_xidx *x, struct xsa *e, double now,
                  struct ipsecchan_xidx_change *c)
{
    struct store *s = &x->sa;
    const struct xfrm_usersa_info *in = SAI(e);
    uint32_t slot;
    if (x->seq == UINT32_MAX && renumber(x)) {
        xfree(x, e);
        return IPSECCHAN_XIDX_ENOMEM;
    }
    e->h.serial = next_serial(x);
    x->seq++;
    if (sa_key_find(x, e->family, e->dst, e->proto, e->spi, &slot)) {
        struct xsa *old = sa_rec(x, slot);
        /* An update keeps the SA's place (its sequence number) and its dying mark. */
        e->seq = old->seq;
        if ((old->bits & SA_DYING) || soft_expired(in, now))
            e->bits |= SA_DYING;
        c->old_handle = handle_of(old->h.serial, slot);
        c->handle = handle_of(e->h.serial, slot);
        watch_sa(x, old, c);
        watch_sa(x, e, c);
        store_unlink_all(x, s, slot);
        xfree(x, old);
        s->v[slot] = &e->h;
        store_link_all(x, s, slot);
        return 0;
    }
    if (store_reserve(x, s)) {
        xfree(x, e);
        return IPSECCHAN_XIDX_ENOMEM;
    }
    e->seq = x->seq;
    if (soft_expired(in, now))
        e->bits |= SA_DYING;
    slot = store_take_slot(s);
    s->v[slot] = &e->h;
    s->n++;
    store_link_all(x, s, slot);
    c->handle = handle_of(e->h.serial, slot);
    watch_sa(x, e, c);
    return 0;
}

/* The SA record being removed or marked: its handle and source address, for the report. */
static void report_sa(const struct ipsecchan_xidx *x, uint32_t slot,
                      struct ipsecchan_xidx_change *c)
{
    const struct xsa *e = sa_rec(x, slot);
    c->old_handle = handle_of(e->h.serial, slot);
    memcpy(c->src, &SAI(e)->saddr, 16);
    c->has_src = 1;
}

static void sa_remove_key(struct ipsecchan_xidx *x, uint16_t fam, const xfrm_address_t *d,
                          uint8_t proto, uint32_t spi_be, struct ipsecchan_xidx_change *c)
{
    uint32_t slot;
    if (sa_key_find(x, fam, norm(fam, d), proto, ntohl(spi_be), &slot)) {
        report_sa(x, slot, c);
        watch_sa(x, sa_rec(x, slot), c);
        store_drop(x, &x->sa, slot);
    }
}

static void sa_flush(struct ipsecchan_xidx *x, uint8_t proto)
{
    struct store *s = &x->sa;
    watch_all(x);
    if (proto == 0 || proto == IPSEC_PROTO_ANY) {
        store_release(x, s);
        store_init(x, s);   /* MIN_BUCKETS heads; on failure the tables stay empty */
        return;
    }
    for (uint32_t i = 0; i < s->top; i++)
        if (s->v[i] && sa_rec(x, i)->proto == proto)
            store_drop(x, s, i);
}

/* ---- policies ---- */

static void tmpl_decode(const uint8_t *p, struct tmplc *t)
{
    struct xfrm_user_tmpl u;
    memcpy(&u, p, sizeof u);
    t->family = u.family;
    t->dst = norm(u.family, &u.id.daddr);
    t->src = norm(u.family, &u.saddr);
    t->spi = ntohl(u.id.spi);
    t->reqid = u.reqid;
    t->proto = u.id.proto;
    t->mode = u.mode;
    t->optional = u.optional;
}

/* Build (not insert) a policy (x NULL: a per-socket policy, memory not counted). */
static int pol_build(struct ipsecchan_xidx *x, const uint8_t *pl, size_t len, size_t off,
                     struct xpol **out, size_t *bad)
{
    const size_t fixed = sizeof(struct xfrm_userpolicy_info);
    if (len < fixed) {
        *bad = off;
        return IPSECCHAN_XIDX_ESHORT;
    }
    size_t toff = ALIGN4(fixed) < len ? ALIGN4(fixed) : len;
    struct ipsecchan_attrspan stack[STACK_SPANS], *sp;
    size_t b;
    int n = split_attrs(pl + toff, len - toff, stack, &sp, &b);
    if (n < 0) {
        *bad = off + toff + b;
        return n;
    }
    struct attrs a;
    int r = check_spans(pl + toff, sp, n, -1, off + toff, 1, &a, bad);
    if (sp != stack)
        free(sp);
    if (r)
        return r;
    struct xpol *p = x ? xmalloc(x, POL_HDR + len) : malloc(POL_HDR + len);
    if (!p)
        return IPSECCHAN_XIDX_ENOMEM;
    memset(p, 0, POL_HDR);
    memcpy(p->msg, pl, len);
    p->h.msg_len = (uint32_t)len;
    struct xfrm_userpolicy_info pi;
    memcpy(&pi, pl, sizeof pi);
    uint16_t fam = pi.sel.family;
    unsigned bits = fam_bits(fam);
    p->family = fam;
    p->s = norm(fam, &pi.sel.saddr);
    p->d = norm(fam, &pi.sel.daddr);
    p->ps = pi.sel.prefixlen_s > bits ? bits : pi.sel.prefixlen_s;
    p->pd = pi.sel.prefixlen_d > bits ? bits : pi.sel.prefixlen_d;
    p->sport = ntohs(pi.sel.sport);
    p->sport_mask = ntohs(pi.sel.sport_mask);
    p->dport = ntohs(pi.sel.dport);
    p->dport_mask = ntohs(pi.sel.dport_mask);
    p->sproto = pi.sel.proto;
    p->ifindex = pi.sel.ifindex;
    p->key = ((uint64_t)pi.priority << 32) | pi.index;
    p->dir = pi.dir;
    p->action = pi.action;
    p->mark_v = a.mark_v;
    p->mark_m = a.mark_m;
    p->if_id = a.if_id;
    p->ntmpl = (uint32_t)(a.tmpl_len / sizeof(struct xfrm_user_tmpl));
    p->tmpl_off = a.tmpl ? (uint32_t)(a.tmpl - pl) : 0;
    if (p->ntmpl)
        tmpl_decode(a.tmpl, &p->t0);
    *out = p;
    return 0;
}

static int cls_add(struct ipsecchan_xidx *x, const struct xpol *p)
{
    struct clist *c = &x->cls[p->dir];
    for (uint32_t i = 0; i < c->n; i++)
        if (c->v[i].family == p->family && c->v[i].ps == p->ps && c->v[i].pd == p->pd) {
            c->v[i].count++;
            if (p->key < c->v[i].minkey)
                c->v[i].minkey = p->key;
            return 0;
        }
    if (c->n == c->cap) {
        uint32_t cap = c->cap ? c->cap * 2 : 8;
        struct cls *v = xrealloc(x, c->v, cap * sizeof *v);
        if (!v)
            return -1;
        c->v = v;
        c->cap = cap;
    }
    c->v[c->n++] = (struct cls){p->family, p->ps, p->pd, 1, p->key};
    return 0;
}

static void cls_del(struct ipsecchan_xidx *x, const struct xpol *p)
{
    struct clist *c = &x->cls[p->dir];
    for (uint32_t i = 0; i < c->n; i++)
        if (c->v[i].family == p->family && c->v[i].ps == p->ps && c->v[i].pd == p->pd) {
            if (--c->v[i].count == 0)
                c->v[i] = c->v[--c->n];
            return;
        }
}

static int pol_key_find(const struct ipsecchan_xidx *x, uint8_t dir, uint32_t index,
                        uint32_t *slot)
{
    const struct store *s = &x->pol;
    uint32_t i = s->t[P_KEY].heads[h_pkey(dir, index) & (s->nb - 1)];
    for (; i != NIL; i = pol_rec(x, i)->h.lk[P_KEY].next) {
        const struct xpol *p = pol_rec(x, i);
        if (p->dir == dir && (uint32_t)p->key == index) {
            *slot = i;
            return 1;
        }
    }
    return 0;
}

static inline uint32_t tss_bucket(const struct ipsecchan_xidx *x, const struct xpol *p)
{
    return (uint32_t)(pol_hash(p, P_TSS) & (x->tss_nb - 1));
}

static void tss_link(struct ipsecchan_xidx *x, struct xpol *p)
{
    uint32_t b = tss_bucket(x, p);
    p->tprev = NULL;
    p->tnext = x->tss[b];
    if (p->tnext)
        p->tnext->tprev = p;
    x->tss[b] = p;
}

static void tss_unlink(struct ipsecchan_xidx *x, struct xpol *p)
{
    if (p->tprev)
        p->tprev->tnext = p->tnext;
    else
        x->tss[tss_bucket(x, p)] = p->tnext;
    if (p->tnext)
        p->tnext->tprev = p->tprev;
    x->tss_n--;
}

/* Room for one more policy in the TSS table. Changes nothing visible. */
static int tss_reserve(struct ipsecchan_xidx *x)
{
    if ((uint64_t)(x->tss_n + 1) * 2 <= x->tss_nb)
        return 0;
    uint32_t nb = x->tss_nb ? x->tss_nb * 2 : 256;
    struct xpol **t = xmalloc(x, (size_t)nb * sizeof *t);
    if (!t)
        return -1;
    memset(t, 0, (size_t)nb * sizeof *t);
    xfree(x, x->tss);
    x->tss = t;
    x->tss_nb = nb;
    for (uint32_t i = 0; i < x->pol.top; i++)
        if (x->pol.v[i] && pol_in_tss(pol_rec(x, i)))
            tss_link(x, pol_rec(x, i));
    return 0;
}

static void pol_drop(struct ipsecchan_xidx *x, uint32_t slot)
{
    struct xpol *p = pol_rec(x, slot);
    if (pol_in_tss(p)) {
        cls_del(x, p);
        tss_unlink(x, p);
    }
    store_drop(x, &x->pol, slot);
}

static int pol_put(struct ipsecchan_xidx *x, struct xpol *p)
{
    struct store *s = &x->pol;
    uint32_t slot;
    int had = pol_key_find(x, p->dir, (uint32_t)p->key, &slot);
    /* Reserve everything first: a failure leaves the index as it was. */
    if ((!had && store_reserve(x, s)) || (pol_in_tss(p) && tss_reserve(x)) ||
        (pol_in_tss(p) && cls_add(x, p))) {
        xfree(x, p);
        return IPSECCHAN_XIDX_ENOMEM;
    }
    p->h.serial = next_serial(x);
    if (had) {
        struct xpol *old = pol_rec(x, slot);
        if (pol_in_tss(old)) {
            cls_del(x, old);
            tss_unlink(x, old);
        }
        store_unlink_all(x, s, slot);
        xfree(x, old);
    } else {
        slot = store_take_slot(s);
        s->n++;
    }
    p->slot = slot;
    s->v[slot] = &p->h;
    store_link_all(x, s, slot);
    if (pol_in_tss(p)) {
        tss_link(x, p);
        x->tss_n++;
    }
    return 0;
}

static void pol_flush(struct ipsecchan_xidx *x)
{
    store_release(x, &x->pol);
    store_init(x, &x->pol);
    for (int d = 0; d < 2; d++)
        x->cls[d].n = 0;
    xfree(x, x->tss);
    x->tss = NULL;
    x->tss_nb = x->tss_n = 0;
}
/* ---- applying messages ---- */

/* The fixed header and attributes of a delete notification; the first XFRMA_SA/POLICY
 * attribute is the embedded record (its fixed part), the others describe it. */
static int check_delete(const uint8_t *pl, size_t len, size_t off, size_t idsize,
                        size_t recsize, const uint8_t **rec, struct attrs *a, size_t *bad)
{
    if (len < idsize) {
        *bad = off;
        return IPSECCHAN_XIDX_ESHORT;
    }
    size_t toff = ALIGN4(idsize) < len ? ALIGN4(idsize) : len;
    struct ipsecchan_attrspan stack[STACK_SPANS], *sp;
    size_t b;
    int n = split_attrs(pl + toff, len - toff, stack, &sp, &b);
    if (n < 0) {
        *bad = off + toff + b;
        return n;
    }
    int r = 0, emb = -1;
    for (int i = 0; i < n && emb < 0; i++)
        if (sp[i].type == XFRMA_SA || sp[i].type == XFRMA_POLICY)
            emb = i;
    *rec = NULL;
    if (emb >= 0) {
        if (sp[emb].len < recsize) {
            *bad = off + toff + sp[emb].offset - sizeof(struct nlattr);
            r = IPSECCHAN_XIDX_ESHORT;
        } else {
            *rec = pl + toff + sp[emb].offset;
            r = check_spans(pl + toff, sp, n, emb, off + toff, recsize ==
                            sizeof(struct xfrm_userpolicy_info), a, bad);
        }
    }
    if (sp != stack)
        free(sp);
    return r;
}

/* One message: 1 if of a handled type and applied, 0 if skipped, < 0 if rejected. */
static int apply_one(struct ipsecchan_xidx *x, uint16_t type, const uint8_t *pl, size_t len,
                     size_t off, double now, size_t *bad, struct ipsecchan_xidx_change *c)
{
    int r;
    struct attrs a;
    switch (type) {
    case XFRM_MSG_NEWSA:
    case XFRM_MSG_UPDSA: {
        struct xsa *e;
        if ((r = sa_build(x, pl, len, off, &e, bad)))
            return r;
        const struct xfrm_usersa_info *in = SAI(e);
        c->family = in->family;
        c->proto = in->id.proto;
        c->spi = ntohl(in->id.spi);
        memcpy(c->dst, &in->id.daddr, 16);
        memcpy(c->src, &in->saddr, 16);
        c->has_src = 1;
        return (r = sa_put(x, e, now, c)) ? r : 1;
    }
    case XFRM_MSG_DELSA: {
        const uint8_t *rec;
        if ((r = check_delete(pl, len, off, sizeof(struct xfrm_usersa_id),
                              sizeof(struct xfrm_usersa_info), &rec, &a, bad)))
            return r;
        struct xfrm_usersa_id id;
        memcpy(&id, pl, sizeof id);
        c->family = id.family;
        c->proto = id.proto;
        c->spi = ntohl(id.spi);
        memcpy(c->dst, &id.daddr, 16);
        if (rec) {                  /* the kernel's copy of the SA: its source address */
            struct xfrm_usersa_info info;
            memcpy(&info, rec, sizeof info);
            memcpy(c->src, &info.saddr, 16);
            c->has_src = 1;
        }
        sa_remove_key(x, id.family, &id.daddr, id.proto, id.spi, c);
        return 1;
    }
    case XFRM_MSG_EXPIRE: {
        struct xfrm_user_expire ue;
        if (len < sizeof ue) {
            *bad = off;
            return IPSECCHAN_XIDX_ESHORT;
        }
        memcpy(&ue, pl, sizeof ue);
        const struct xfrm_usersa_info *st = &ue.state;
        uint32_t slot;
        c->family = st->family;
        c->proto = st->id.proto;
        c->spi = ntohl(st->id.spi);
        c->hard = ue.hard;
        memcpy(c->dst, &st->id.daddr, 16);
        memcpy(c->src, &st->saddr, 16);
        c->has_src = 1;
        if (sa_key_find(x, st->family, norm(st->family, &st->id.daddr), st->id.proto,
                        ntohl(st->id.spi), &slot)) {
            watch_sa(x, sa_rec(x, slot), c);
            if (ue.hard) {
                c->old_handle = handle_of(sa_rec(x, slot)->h.serial, slot);
                store_drop(x, &x->sa, slot);
            } else {
                sa_rec(x, slot)->bits |= SA_DYING;
                c->handle = handle_of(sa_rec(x, slot)->h.serial, slot);
            }
        }
        return 1;
    }
    case XFRM_MSG_FLUSHSA: {
        struct xfrm_usersa_flush f;
        if (len < sizeof f) {
            *bad = off;
            return IPSECCHAN_XIDX_ESHORT;
        }
        memcpy(&f, pl, sizeof f);
        c->proto = f.proto;
        sa_flush(x, f.proto);
        return 1;
    }
    case XFRM_MSG_NEWPOLICY:
    case XFRM_MSG_UPDPOLICY: {
        struct xpol *p;
        if ((r = pol_build(x, pl, len, off, &p, bad)))
            return r;
        if (p->dir >= XFRM_POLICY_MAX && p->dir < 2 * XFRM_POLICY_MAX) {
            xfree(x, p);          /* a per-socket policy: not part of the main SPD */
            return 1;
        }
        return (r = pol_put(x, p)) ? r : 1;
    }
    case XFRM_MSG_DELPOLICY: {
        const uint8_t *rec;
        if ((r = check_delete(pl, len, off, sizeof(struct xfrm_userpolicy_id),
                              sizeof(struct xfrm_userpolicy_info), &rec, &a, bad)))
            return r;
        uint8_t dir;
        uint32_t index, slot;
        if (rec) {
            struct xfrm_userpolicy_info pi;
            memcpy(&pi, rec, sizeof pi);
            dir = pi.dir;
            index = pi.index;
        } else {
            struct xfrm_userpolicy_id id;
            memcpy(&id, pl, sizeof id);
            dir = id.dir;
            index = id.index;
        }
        if (pol_key_find(x, dir, index, &slot))
            pol_drop(x, slot);
        return 1;
    }
    case XFRM_MSG_POLEXPIRE: {
        struct xfrm_user_polexpire pe;
        uint32_t slot;
        if (len < sizeof pe) {
            *bad = off;
            return IPSECCHAN_XIDX_ESHORT;
        }
        memcpy(&pe, pl, sizeof pe);
        c->hard = pe.hard;
        if (pe.hard && pol_key_find(x, pe.pol.dir, pe.pol.index, &slot))
            pol_drop(x, slot);
        return 1;
    }
    case XFRM_MSG_FLUSHPOLICY:
        pol_flush(x);
        return 1;
    case XFRM_MSG_ACQUIRE:
        /* Not applied, but decoded by the reference: a short one is an error there too. */
        if (len < sizeof(struct xfrm_user_acquire)) {
            *bad = off;
            return IPSECCHAN_XIDX_ESHORT;
        }
        return 0;
    default:
        return 0;
    }
}

static int64_t apply_buf(struct ipsecchan_xidx *x, const uint8_t *buf, size_t len,
                         double now, size_t *bad_offset, int64_t *applied,
                         struct ipsecchan_xidx_change *changes, size_t changes_cap,
                         size_t *nchanges)
{
    *applied = 0;
    *bad_offset = 0;
    if (nchanges)
        *nchanges = 0;
    if (!x->sa.t[0].heads || !x->pol.t[0].heads) {      /* a flush could not re-allocate */
        if ((!x->sa.t[0].heads && store_init(x, &x->sa)) ||
            (!x->pol.t[0].heads && store_init(x, &x->pol)))
            return IPSECCHAN_XIDX_ENOMEM;
    }
    size_t cap = len / sizeof(struct nlmsghdr) + 1;
    struct ipsecchan_nlspan *sp = malloc(cap * sizeof *sp);
    if (!sp)
        return IPSECCHAN_XIDX_ENOMEM;
    int n = ipsecchan_nl_split(buf, len, sp, cap, bad_offset);
    if (n < 0) {
        free(sp);
        return IPSECCHAN_XIDX_ENETLINK;
    }
    if (changes && (size_t)n > changes_cap) {
        free(sp);
        return IPSECCHAN_XIDX_ESPACE;
    }
    int64_t count = 0;
    for (int i = 0; i < n; i++) {
        size_t off = sp[i].offset + sizeof(struct nlmsghdr);
        struct ipsecchan_xidx_change scratch, *c = changes ? &changes[i] : &scratch;
        memset(c, 0, sizeof *c);
        c->type = sp[i].type;
        c->offset = sp[i].offset;
        c->len = sp[i].len;
        int r = apply_one(x, sp[i].type, buf + off, sp[i].len - sizeof(struct nlmsghdr), off,
                          now, bad_offset, c);
        if (r < 0) {
            free(sp);
            *applied = count;
            if (nchanges)
                *nchanges = (size_t)i;
            return r;
        }
        count += r;
    }
    free(sp);
    *applied = count;
    if (nchanges)
        *nchanges = (size_t)n;
    return count;
}

int64_t ipsecchan_xidx_apply(struct ipsecchan_xidx *x, const uint8_t *buf, size_t len,
                             double now, size_t *bad_offset, int64_t *applied)
{
    return apply_buf(x, buf, len, now, bad_offset, applied, NULL, 0, NULL);
}

int64_t ipsecchan_xidx_apply_report(struct ipsecchan_xidx *x, const uint8_t *buf, size_t len,
                                    double now, size_t *bad_offset, int64_t *applied,
                                    struct ipsecchan_xidx_change *changes, size_t changes_cap,
                                    size_t *nchanges)
{
    return apply_buf(x, buf, len, now, bad_offset, applied, changes, changes_cap, nchanges);
}

/* ---- lookup ---- */

struct flowc {
    u128 local, remote;
    uint32_t mark, if_id;
    int32_t ifindex;
    uint16_t family, lport, rport;
    uint8_t proto;
};

static inline int prefix_ok(uint16_t ffam, u128 a, u128 n, unsigned plen)
{
    if (!famok(ffam) || plen == 0)
        return 1;
    unsigned bits = fam_bits(ffam);
    if (plen > bits)
        plen = bits;
    unsigned sh = bits - plen;
    return (a >> sh) == (n >> sh);
}

/* A selector of a stored message (SA selectors that are not all-wildcard). */
static int sel_match(const struct xfrm_selector *sel, u128 sn, u128 dn, const struct flowc *f,
                     int out)
{
    u128 src = out ? f->local : f->remote, dst = out ? f->remote : f->local;
    uint16_t sport = out ? f->lport : f->rport, dport = out ? f->rport : f->lport;
    return !((dport ^ ntohs(sel->dport)) & ntohs(sel->dport_mask))
        && !((sport ^ ntohs(sel->sport)) & ntohs(sel->sport_mask))
        && (sel->proto == 0 || sel->proto == f->proto)
        && (sel->ifindex == 0 || sel->ifindex == f->ifindex)
        && prefix_ok(f->family, dst, dn, sel->prefixlen_d)
        && prefix_ok(f->family, src, sn, sel->prefixlen_s);
}

/* The policy's family is the flow's once the first test passes, so its clamped prefix
 * lengths are those sel_match would clamp. */
static inline int pol_match(const struct xpol *p, const struct flowc *f, int out)
{
    u128 src = out ? f->local : f->remote, dst = out ? f->remote : f->local;
    uint16_t sport = out ? f->lport : f->rport, dport = out ? f->rport : f->lport;
    return p->family == f->family && p->if_id == f->if_id &&
           (f->mark & p->mark_m) == p->mark_v &&
           !((dport ^ p->dport) & p->dport_mask) && !((sport ^ p->sport) & p->sport_mask) &&
           (p->sproto == 0 || p->sproto == f->proto) &&
           (p->ifindex == 0 || p->ifindex == f->ifindex) &&
           prefix_ok(f->family, dst, p->d, p->pd) && prefix_ok(f->family, src, p->s, p->ps);
}

/* The cache lines of the first n bytes at p. */
static inline void prefetch_lines(const void *p, unsigned n)
{
    for (unsigned i = 0; i < n; i += 64)
        PREFETCH((const char *)p + i);
    PREFETCH((const char *)p + n - 1);
}

#define PF_CLASSES 8                 /* classes whose buckets are prefetched */

/* Where a policy lookup will look: the bucket of each class (NIL: class skipped). */
struct polprobe { uint32_t b[PF_CLASSES]; };

static void pol_probe_start(const struct ipsecchan_xidx *x, const struct flowc *f, int dir,
                            struct polprobe *pp)
{
    const struct clist *c = &x->cls[dir];
    u128 src = dir ? f->local : f->remote, dst = dir ? f->remote : f->local;
    for (uint32_t k = 0; k < c->n && k < PF_CLASSES; k++) {
        const struct cls *cl = &c->v[k];
        if (cl->family != f->family) {
            pp->b[k] = NIL;
            continue;
        }
        uint64_t h = h_tss((uint8_t)dir, cl->family, cl->ps, cl->pd,
                           tss_addr(cl->family, src, cl->ps), tss_addr(cl->family, dst, cl->pd));
        pp->b[k] = (uint32_t)(h & (x->tss_nb - 1));
    }
}

static const struct xpol *find_policy(const struct ipsecchan_xidx *x, const struct flowc *f,
                                      int dir, const struct polprobe *pp, uint32_t *bslot)
{
    const struct clist *c = &x->cls[dir];
    const struct xpol *best = NULL;
    uint64_t bestkey = UINT64_MAX;
    if (!x->tss_n)
        return NULL;
    u128 src = dir ? f->local : f->remote, dst = dir ? f->remote : f->local;
    for (uint32_t k = 0; k < c->n; k++) {
        const struct cls *cl = &c->v[k];
        if (cl->family != f->family || (best && cl->minkey > bestkey))
            continue;
        uint32_t b;
        if (k < PF_CLASSES) {
            b = pp->b[k];
        } else {
            uint64_t h = h_tss((uint8_t)dir, cl->family, cl->ps, cl->pd,
                               tss_addr(cl->family, src, cl->ps),
                               tss_addr(cl->family, dst, cl->pd));
            b = (uint32_t)(h & (x->tss_nb - 1));
        }
        for (const struct xpol *p = x->tss[b]; p; p = p->tnext)
            if (p->key < bestkey && p->dir == dir && pol_match(p, f, dir))
                best = p, bestkey = p->key, *bslot = p->slot;
    }
    return best;
}

static inline void tmpl_at(const struct xpol *p, uint32_t i, struct tmplc *t)
{
    if (i == 0)
        *t = p->t0;
    else
        tmpl_decode(p->msg + p->tmpl_off + (size_t)i * sizeof(struct xfrm_user_tmpl), t);
}

static int out_candidate(const struct xsa *e, const struct tmplc *t, const struct xpol *pol,
                         const struct flowc *f, u128 dst, u128 src)
{
    uint16_t fam = t->family;
    if (e->family != fam || e->reqid != t->reqid || e->mode != t->mode ||
        e->proto != t->proto || (t->spi && e->spi != t->spi) || e->spi == 0 ||
        ((pol->mark_v & pol->mark_m) & e->mark_m) != e->mark_v || e->if_id != pol->if_id ||
        (e->flags & STATE_WILDRECV))
        return 0;
    u128 sd = cmpv(fam, e->dst), ss = cmpv(fam, e->src), fs = cmpv(fam, src);
    if (cmpv(fam, dst) != sd || !(fs == ss || fs == 0 || ss == 0))
        return 0;
    if (e->bits & SEL_OUT_ANY)
        return 1;
    const struct xfrm_selector *sel = &SAI(e)->sel;
    return sel->family == f->family &&
        sel_match(sel, norm(sel->family, &sel->saddr), norm(sel->family, &sel->daddr), f, 1);
}

static int in_accepts(const struct xsa *e, const struct tmplc *t, const struct xpol *pol,
                      const struct flowc *f)
{
    uint16_t fam = t->family;
    if (t->mode == XFRM_MODE_TRANSPORT) {
        if (e->family != f->family || cmpv(fam, e->dst) != cmpv(fam, f->local))
            return 0;
    } else {
        u128 ts = cmpv(fam, t->src);
        if (e->family != fam || cmpv(fam, e->dst) != cmpv(fam, t->dst) ||
            !(ts == 0 || ts == cmpv(fam, e->src)))
            return 0;
    }
    if (e->spi == 0 || e->proto != t->proto || e->mode != t->mode ||
        (t->spi && e->spi != t->spi) || (t->reqid && e->reqid != t->reqid) ||
        (pol->if_id && e->if_id != pol->if_id))
        return 0;
    if (e->bits & SEL_IN_ANY)
        return 1;
    const struct xfrm_selector *sel = &SAI(e)->sel;
    return sel_match(sel, norm(sel->family, &sel->saddr), norm(sel->family, &sel->daddr), f, 0);
}

/* The OUT chain of a template: its bucket. */
static inline uint32_t out_bucket(const struct ipsecchan_xidx *x, const struct tmplc *t,
                                  const struct flowc *f)
{
    int tunnel = t->mode == XFRM_MODE_TUNNEL || t->mode == XFRM_MODE_BEET;
    u128 dst = tunnel ? t->dst : f->remote;
    return (uint32_t)(h_out(t->family, t->reqid, t->proto, t->mode, cmpv(t->family, dst)) &
                      (x->sa.nb - 1));
}

/* The IN chain of a template: table and bucket (-1: no table, a linear scan). */
static inline int in_bucket(const struct ipsecchan_xidx *x, const struct tmplc *t,
                            const struct flowc *f, uint32_t *b)
{
    int transport = t->mode == XFRM_MODE_TRANSPORT;
    if (!famok(t->family) || (transport && !famok(f->family)))
        return -1;
    u128 X = transport ? f->local : t->dst;
    int tab;
    uint64_t h;
    if (t->spi)
        tab = T_KEY, h = h_key(transport ? f->family : t->family, X, t->proto, t->spi);
    else if (t->reqid)
        tab = T_INR, h = h_inr(X, t->proto, t->mode, t->reqid);
    else
        tab = T_IN, h = h_in(X, t->proto, t->mode);
    *b = (uint32_t)(h & (x->sa.nb - 1));
    return tab;
}

struct writer { uint64_t *out; size_t cap, n; };

static inline void put(struct writer *w, uint64_t v)
{
    if (w->n < w->cap)
        w->out[w->n] = v;
    w->n++;
}

static inline uint64_t sa_handle(const struct ipsecchan_xidx *x, uint32_t slot)
{
    return handle_of(sa_rec(x, slot)->h.serial, slot);
}

/* A growable array of slots. */
struct slots { uint32_t *v, n, cap; uint32_t stack[16]; };

static int slots_push(struct slots *s, uint32_t slot)
{
    if (s->n == s->cap) {
        uint32_t cap = s->cap * 2;
        uint32_t *v = s->v == s->stack ? malloc(cap * sizeof *v) : realloc(s->v, cap * sizeof *v);
        if (!v)
            return -1;
        if (s->v == s->stack)
            memcpy(v, s->stack, sizeof s->stack);
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = slot;
    return 0;
}

static void slots_init(struct slots *s) { s->v = s->stack; s->n = 0; s->cap = 16; }
static void slots_free(struct slots *s) { if (s->v != s->stack) free(s->v); }

static int out_path(const struct ipsecchan_xidx *x, const struct flowc *f,
                    const struct xpol *pol, uint64_t ph, uint64_t flags, unsigned defaults,
                    struct writer *w)
{
    if (!pol) {
        put(w, defaults & IPSECCHAN_XIDX_DEFAULT_OUT_BLOCK ? IPSECCHAN_XIDX_BLOCK
                                                          : IPSECCHAN_XIDX_NO_POLICY);
        put(w, 0); put(w, 0); put(w, 0);
        return 0;
    }
    if (pol->action == XFRM_POLICY_BLOCK) {
        put(w, IPSECCHAN_XIDX_BLOCK); put(w, ph); put(w, flags); put(w, 0);
        return 0;
    }
    struct slots chosen;
    slots_init(&chosen);
    const struct store *s = &x->sa;
    for (uint32_t k = 0; k < pol->ntmpl; k++) {
        struct tmplc t;
        tmpl_at(pol, k, &t);
        int tunnel = t.mode == XFRM_MODE_TUNNEL || t.mode == XFRM_MODE_BEET;
        u128 dst = tunnel ? t.dst : f->remote;
        u128 src = tunnel ? (cmpv(t.family, t.src) == 0 ? f->local : t.src) : f->local;
        const struct xsa *best = NULL;
        uint32_t bslot = NIL;
        if (s->n) {
            for (uint32_t i = s->t[T_OUT].heads[out_bucket(x, &t, f)]; i != NIL;) {
                const struct xsa *e = sa_rec(x, i);
                /* rank: not dying, then the newest add_time, then the latest inserted */
                if (out_candidate(e, &t, pol, f, dst, src) &&
                    (!best || (!dying(e) > !dying(best)) ||
                     (!dying(e) == !dying(best) &&
                      (SAI(e)->curlft.add_time > SAI(best)->curlft.add_time ||
                       (SAI(e)->curlft.add_time == SAI(best)->curlft.add_time &&
                        e->seq > best->seq)))))
                    best = e, bslot = i;
                i = e->h.lk[T_OUT].next;
            }
        }
        if (!best) {
            if (t.optional)
                continue;
            put(w, IPSECCHAN_XIDX_NO_SA); put(w, ph); put(w, flags); put(w, 0);
            slots_free(&chosen);
            return 0;
        }
        if (slots_push(&chosen, bslot)) {
            slots_free(&chosen);
            return IPSECCHAN_XIDX_ENOMEM;
        }
    }
    put(w, chosen.n ? IPSECCHAN_XIDX_PROTECTED : IPSECCHAN_XIDX_BYPASS);
    put(w, ph); put(w, flags); put(w, chosen.n);
    for (uint32_t k = 0; k < chosen.n; k++)
        put(w, sa_handle(x, chosen.v[k]));
    slots_free(&chosen);
    return 0;
}

static const struct ipsecchan_xidx *sort_ctx;

static int by_seq(const void *a, const void *b)
{
    uint64_t sa = sa_rec(sort_ctx, *(const uint32_t *)a)->seq;
    uint64_t sb = sa_rec(sort_ctx, *(const uint32_t *)b)->seq;
    return sa < sb ? -1 : sa > sb;
}

static void sort_by_seq(const struct ipsecchan_xidx *x, uint32_t *v, uint32_t n)
{
    /* Chains are short: insertion sort, no shared state. Long ones: qsort. */
    if (n <= 32) {
        for (uint32_t i = 1; i < n; i++) {
            uint32_t k = v[i], j = i;
            uint64_t sk = sa_rec(x, k)->seq;
            while (j && sa_rec(x, v[j - 1])->seq > sk) {
                v[j] = v[j - 1];
                j--;
            }
            v[j] = k;
        }
        return;
    }
    sort_ctx = x;
    qsort(v, n, sizeof *v, by_seq);
}

static int in_path(const struct ipsecchan_xidx *x, const struct flowc *f,
                   const struct xpol *pol, uint64_t ph, uint64_t flags, unsigned defaults,
                   struct writer *w)
{
    if (!pol) {
        int block = defaults & IPSECCHAN_XIDX_DEFAULT_IN_BLOCK;
        put(w, block ? IPSECCHAN_XIDX_BLOCK : IPSECCHAN_XIDX_NO_POLICY);
        put(w, 0); put(w, block ? 0 : 2); put(w, 0);
        return 0;
    }
    if (pol->action == XFRM_POLICY_BLOCK) {
        put(w, IPSECCHAN_XIDX_BLOCK); put(w, ph); put(w, flags); put(w, 0);
        return 0;
    }
    if (!pol->ntmpl) {
        put(w, IPSECCHAN_XIDX_BYPASS); put(w, ph); put(w, flags | 2); put(w, 0);
        return 0;
    }
    const struct store *s = &x->sa;
    struct slots acc, these;
    slots_init(&acc);
    slots_init(&these);
    int missing = 0, all_optional = 1, r = 0;
    for (uint32_t k = 0; k < pol->ntmpl && !r; k++) {
        struct tmplc t;
        tmpl_at(pol, k, &t);
        these.n = 0;
        uint32_t b;
        int tab = s->n ? in_bucket(x, &t, f, &b) : -2;
        if (tab == -1) {
            for (uint32_t i = 0; i < s->top && !r; i++)
                if (s->v[i] && in_accepts(sa_rec(x, i), &t, pol, f))
                    r = slots_push(&these, i);
        } else if (tab >= 0) {
            for (uint32_t i = s->t[tab].heads[b]; i != NIL && !r;) {
                const struct xsa *e = sa_rec(x, i);
                if (in_accepts(e, &t, pol, f))
                    r = slots_push(&these, i);
                i = e->h.lk[tab].next;
            }
        }
        sort_by_seq(x, these.v, these.n);
        for (uint32_t i = 0; i < these.n && !r; i++) {
            int dup = 0;
            if (k)
                for (uint32_t j = 0; j < acc.n && !dup; j++)
                    dup = acc.v[j] == these.v[i];
            if (!dup)
                r = slots_push(&acc, these.v[i]);
        }
        missing |= !these.n && !t.optional;
        all_optional &= t.optional != 0;
    }
    if (!r) {
        put(w, missing ? IPSECCHAN_XIDX_NO_SA : IPSECCHAN_XIDX_PROTECTED);
        put(w, ph); put(w, flags | (all_optional ? 2 : 0)); put(w, acc.n);
        for (uint32_t k = 0; k < acc.n; k++)
            put(w, sa_handle(x, acc.v[k]));
    }
    slots_free(&acc);
    slots_free(&these);
    return r ? IPSECCHAN_XIDX_ENOMEM : 0;
}

static int sock_policy(const char *msg, size_t len, struct xpol **out)
{
    size_t bad;
    *out = NULL;
    if (!msg)
        return 0;
    return pol_build(NULL, (const uint8_t *)msg, len, 0, out, &bad);
}

/* A chain to prefetch. */
struct probe { const struct store *s; int t; uint32_t b, slot; };

#define MAX_PROBES (2 * PF_CLASSES)

/* Fetch the first `depth` records of each chain, one level at a time (bucket word, slot
 * pointer, record, next link, ...) for all chains at once: their misses overlap instead of
 * adding up. */
static void prefetch_chains(struct probe *p, int n, int depth)
{
    for (int i = 0; i < n; i++)
        PREFETCH(&p[i].s->t[p[i].t].heads[p[i].b]);
    for (int i = 0; i < n; i++) {
        p[i].slot = p[i].s->t[p[i].t].heads[p[i].b];
        if (p[i].slot != NIL)
            PREFETCH(&p[i].s->v[p[i].slot]);
    }
    for (int d = 0; d < depth; d++) {
        for (int i = 0; i < n; i++)
            if (p[i].slot != NIL)
                prefetch_lines(p[i].s->v[p[i].slot], p[i].s->hot);
        if (d + 1 == depth)
            break;
        for (int i = 0; i < n; i++)
            if (p[i].slot != NIL) {
                p[i].slot = p[i].s->v[p[i].slot]->lk[p[i].t].next;
                if (p[i].slot != NIL)
                    PREFETCH(&p[i].s->v[p[i].slot]);
            }
    }
}

/* The first SA chain of a policy's path. */
static int sa_probe(const struct ipsecchan_xidx *x, const struct flowc *f,
                    const struct xpol *pol, int out, struct probe *p)
{
    if (!pol || pol->action == XFRM_POLICY_BLOCK || !pol->ntmpl || !x->sa.n)
        return 0;
    uint32_t b;
    int tab = T_OUT;
    if (out)
        b = out_bucket(x, &pol->t0, f);
    else if ((tab = in_bucket(x, &pol->t0, f, &b)) < 0)
        return 0;
    *p = (struct probe){&x->sa, tab, b, NIL};
    return 1;
}

int64_t ipsecchan_xidx_lookup(const struct ipsecchan_xidx *x, uint16_t family,
                              uint8_t proto, const char *local, uint16_t local_port,
                              const char *remote, uint16_t remote_port, uint32_t mark,
                              int32_t ifindex, uint32_t if_id,
                              const char *sock_out, size_t sock_out_len,
                              const char *sock_in, size_t sock_in_len,
                              unsigned defaults, uint64_t *out, size_t out_cap)
{
    struct flowc f = {
        .local = load_be16((const uint8_t *)local),
        .remote = load_be16((const uint8_t *)remote),
        .mark = mark, .if_id = if_id, .ifindex = ifindex, .family = family,
        .lport = local_port, .rport = remote_port, .proto = proto,
    };
    struct xpol *so, *si;
    int r = sock_policy(sock_out, sock_out_len, &so);
    if (r)
        return r;
    if ((r = sock_policy(sock_in, sock_in_len, &si))) {
        free(so);
        return r;
    }
    /* Both directions at once, one level of the dependency chain at a time: policy
     * buckets, policy records, SA buckets, SA records; the misses of a level overlap. */
    struct polprobe ppo = {{0}}, ppi = {{0}};
    int main_out = !(so && pol_match(so, &f, 1)), main_in = !(si && pol_match(si, &f, 0));
    struct probe pr[MAX_PROBES];
    int npr = 0;
    if (x->tss_n) {
        const struct xpol *pp[MAX_PROBES];
        uint32_t pb[MAX_PROBES];
        for (int dir = 1; dir >= 0; dir--) {
            if (!(dir ? main_out : main_in))
                continue;
            struct polprobe *q = dir ? &ppo : &ppi;
            pol_probe_start(x, &f, dir, q);
            for (uint32_t k = 0; k < x->cls[dir].n && k < PF_CLASSES; k++)
                if (q->b[k] != NIL) {
                    PREFETCH(&x->tss[q->b[k]]);
                    pb[npr++] = q->b[k];
                }
        }
        /* bucket words, then the first two records of each chain */
        for (int i = 0; i < npr; i++)
            if ((pp[i] = x->tss[pb[i]]))
                prefetch_lines(pp[i], POL_HDR);
        for (int i = 0; i < npr; i++)
            if (pp[i] && pp[i]->tnext)
                prefetch_lines(pp[i]->tnext, POL_HDR);
        npr = 0;
    }
    uint32_t so_slot = 0, si_slot = 0;
    const struct xpol *po = main_out ? find_policy(x, &f, 1, &ppo, &so_slot) : so;
    const struct xpol *pi = main_in ? find_policy(x, &f, 0, &ppi, &si_slot) : si;
    npr = sa_probe(x, &f, po, 1, &pr[0]);
    npr += sa_probe(x, &f, pi, 0, &pr[npr]);
    prefetch_chains(pr, npr, 2);
    uint64_t pho = !po ? 0 : main_out ? handle_of(po->h.serial, so_slot)
                                      : IPSECCHAN_XIDX_SOCKET_POLICY;
    uint64_t phi = !pi ? 0 : main_in ? handle_of(pi->h.serial, si_slot)
                                     : IPSECCHAN_XIDX_SOCKET_POLICY;
    struct writer w = {out, out_cap, 0};
    r = out_path(x, &f, po, pho, !main_out, defaults, &w);
    if (!r)
        r = in_path(x, &f, pi, phi, !main_in, defaults, &w);
    free(so);
    free(si);
    return r ? r : (int64_t)w.n;
}

int64_t ipsecchan_xidx_lookup_flow(const struct ipsecchan_xidx *x, uint16_t family,
                                   uint8_t proto, const char *local, uint16_t local_port,
                                   const char *remote, uint16_t remote_port, uint32_t mark,
                                   int32_t ifindex, uint32_t if_id, unsigned defaults,
                                   uint64_t *out, size_t out_cap)
{
    return ipsecchan_xidx_lookup(x, family, proto, local, local_port, remote, remote_port,
                                 mark, ifindex, if_id, NULL, 0, NULL, 0, defaults, out, out_cap);
}

/* ---- views and lifecycle ---- */

size_t ipsecchan_xidx_sa_count(const struct ipsecchan_xidx *x) { return x->sa.n; }
size_t ipsecchan_xidx_policy_count(const struct ipsecchan_xidx *x) { return x->pol.n; }
size_t ipsecchan_xidx_memory(const struct ipsecchan_xidx *x) { return x->mem; }

struct seqh { uint64_t seq, handle; };

static int by_seqh(const void *a, const void *b)
{
    uint64_t x = ((const struct seqh *)a)->seq, y = ((const struct seqh *)b)->seq;
    return x < y ? -1 : x > y;
}

size_t ipsecchan_xidx_sa_handles(const struct ipsecchan_xidx *x, uint64_t *out, size_t max)
{
    const struct store *s = &x->sa;
    struct seqh *v = malloc(((size_t)s->n + 1) * sizeof *v);
    if (!v)
        return 0;
    size_t n = 0;
    for (uint32_t i = 0; i < s->top; i++)
        if (s->v[i])
            v[n++] = (struct seqh){sa_rec(x, i)->seq, sa_handle(x, i)};
    qsort(v, n, sizeof *v, by_seqh);
    for (size_t i = 0; i < n && i < max; i++)
        out[i] = v[i].handle;
    free(v);
    return n;
}

size_t ipsecchan_xidx_policy_handles(const struct ipsecchan_xidx *x, uint64_t *out,
                                     size_t max)
{
    const struct store *s = &x->pol;
    size_t n = 0;
    for (uint32_t i = 0; i < s->top; i++)
        if (s->v[i]) {
            if (n < max)
                out[n] = handle_of(pol_rec(x, i)->h.serial, i);
            n++;
        }
    return n;
}

static const struct hdr *resolve(const struct store *s, uint64_t h)
{
    uint32_t slot = (uint32_t)h, serial = (uint32_t)(h >> 32);
    if (slot >= s->top)
        return NULL;
    const struct hdr *e = s->v[slot];
    return e && e->serial == serial ? e : NULL;
}

const uint8_t *ipsecchan_xidx_sa_message(const struct ipsecchan_xidx *x, uint64_t handle,
                                         size_t *len)
{
    const struct xsa *e = (const struct xsa *)resolve(&x->sa, handle);
    *len = e ? e->h.msg_len : 0;
    return e ? e->msg : NULL;
}

const uint8_t *ipsecchan_xidx_policy_message(const struct ipsecchan_xidx *x,
                                             uint64_t handle, size_t *len)
{
    const struct xpol *e = (const struct xpol *)resolve(&x->pol, handle);
    *len = e ? e->h.msg_len : 0;
    return e ? e->msg : NULL;
}

struct ipsecchan_xidx *ipsecchan_xidx_new(void)
{
    struct ipsecchan_xidx *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->mem = malloc_usable_size(x) + sizeof(size_t);
    x->sa.ntab = 4;
    x->pol.ntab = 1;     /* KEY; the TSS table is x->tss */
    x->sa.hot = SA_HDR;
    x->pol.hot = POL_HDR;
    if (store_init(x, &x->sa) || store_init(x, &x->pol)) {
        ipsecchan_xidx_free(x);
        return NULL;
    }
    return x;
}

void ipsecchan_xidx_clear(struct ipsecchan_xidx *x)
{
    sa_flush(x, 0);
    pol_flush(x);
}

void ipsecchan_xidx_free(struct ipsecchan_xidx *x)
{
    if (!x)
        return;
    store_release(x, &x->sa);
    store_release(x, &x->pol);
    for (int d = 0; d < 2; d++)
        xfree(x, x->cls[d].v);
    xfree(x, x->tss);
    xfree(x, x->w.v);
    xfree(x, x->w.heads);
    xfree(x, x->w.touched);
    free(x);
}

int64_t ipsecchan_xidx_bench(const struct ipsecchan_xidx *x,
                             const struct ipsecchan_xidx_flow *flows, size_t nflows,
                             size_t rounds, unsigned defaults, uint64_t *ns_out)
{
    uint64_t out[256];
    int64_t total = 0;
    for (size_t r = 0; r < rounds; r++)
        for (size_t i = 0; i < nflows; i++) {
            const struct ipsecchan_xidx_flow *f = &flows[i];
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            int64_t n = ipsecchan_xidx_lookup(x, f->family, f->proto, f->local, f->local_port,
                                              f->remote, f->remote_port, f->mark, f->ifindex,
                                              f->if_id, NULL, 0, NULL, 0, defaults, out, 256);
            clock_gettime(CLOCK_MONOTONIC, &b);
            if (n < 0)
                return n;
            total += n;
            ns_out[r * nflows + i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u +
                                     (uint64_t)(b.tv_nsec - a.tv_nsec);
        }
    return total;
}

int64_t ipsecchan_xidx_sa_info(const struct ipsecchan_xidx *x, uint64_t handle,
                               struct ipsecchan_xidx_sainfo *out, uint8_t *prot,
                               size_t prot_cap)
{
    const struct xsa *e = (const struct xsa *)resolve(&x->sa, handle);
    if (!e)
        return -1;
    struct xfrm_usersa_info in;
    memcpy(&in, e->msg, sizeof in);
    memset(out, 0, sizeof *out);
    out->add_time = in.curlft.add_time;
    out->spi = e->spi;
    out->reqid = e->reqid;
    out->family = e->family;
    out->proto = e->proto;
    out->mode = e->mode;
    out->flags = e->flags;
    out->dying = (uint8_t)dying(e);
    memcpy(out->dst, &in.id.daddr, 16);
    memcpy(out->src, &in.saddr, 16);
    out->sel_other = (uint8_t)sel_other(&in);
    /* The protection key: every algorithm attribute as stored (its fixed part: name, key
     * length, ICV or truncation length; never key bytes), then the presence of UDP
     * encapsulation. The stored attributes were checked when the record was built. */
    size_t toff = ALIGN4(sizeof in), w = 0, mlen = e->h.msg_len;
    while (toff + sizeof(struct nlattr) <= mlen) {
        struct nlattr h;
        memcpy(&h, e->msg + toff, sizeof h);
        if (h.nla_len < sizeof h || toff + h.nla_len > mlen)
            break;
        uint16_t t = h.nla_type & NLA_TYPE_MASK;
        if (algo_fixed(t)) {
            if (w + h.nla_len <= prot_cap)
                memcpy(prot + w, e->msg + toff, h.nla_len);
            w += h.nla_len;
        } else if (t == XFRMA_ENCAP) {
            out->encap = 1;
        }
        toff += ALIGN4(h.nla_len);
    }
    out->prot_len = (uint32_t)w;
    return 0;
}


/* ---- class tags and followed flows: revalidating latches in one call ---- */

int64_t ipsecchan_xidx_sa_set_tag(struct ipsecchan_xidx *x, uint64_t handle, uint32_t tag)
{
    struct xsa *e = (struct xsa *)resolve(&x->sa, handle);
    if (!e || tag > IPSECCHAN_XIDX_TAG_MAX)
        return -1;
    e->tag = (uint16_t)tag;
    return 0;
}

uint32_t ipsecchan_xidx_sa_tag(const struct ipsecchan_xidx *x, uint64_t handle)
{
    const struct xsa *e = (const struct xsa *)resolve(&x->sa, handle);
    return e ? e->tag : 0;
}

void ipsecchan_xidx_clear_tags(struct ipsecchan_xidx *x)
{
    for (uint32_t i = 0; i < x->sa.top; i++)
        if (x->sa.v[i])
            sa_rec(x, i)->tag = 0;
}

/* ---- watched flows ---- */

/* The SA's selector names addresses other than its own two (a tunnel's inner ones); a
 * wildcard (family 0) or the SA's own host pair does not. */
static int sel_other(const struct xfrm_usersa_info *in)
{
    unsigned full = fam_bits(in->sel.family);
    return in->sel.family != 0 &&
        !(famok(in->sel.family) && in->sel.family == in->family &&
          in->sel.prefixlen_s == full && in->sel.prefixlen_d == full &&
          !memcmp(&in->sel.saddr, &in->saddr, 16) && !memcmp(&in->sel.daddr, &in->id.daddr, 16));
}

/* Selector scans (tunnel SAs) before a take counts every slot as touched instead: a burst
 * of tunnel rekeys costs one pass over the latches, not one per SA. */
#define WATCH_SCANS 8

static inline uint32_t w_bucket(const struct watch *w, uint16_t fam, u128 a)
{
    return (uint32_t)mix128(mix(7, fam), a) & (w->nb - 1);
}

static void w_link(struct watch *w, uint32_t slot)
{
    struct wslot *e = &w->v[slot];
    uint32_t b = w_bucket(w, e->family, e->addr);
    e->prev = NIL;
    e->next = w->heads[b];
    if (e->next != NIL)
        w->v[e->next].prev = slot;
    w->heads[b] = slot;
}

static void w_unlink(struct watch *w, uint32_t slot)
{
    struct wslot *e = &w->v[slot];
    if (e->prev != NIL)
        w->v[e->prev].next = e->next;
    else
        w->heads[w_bucket(w, e->family, e->addr)] = e->next;
    if (e->next != NIL)
        w->v[e->next].prev = e->prev;
}

static inline void w_mark(struct watch *w, uint32_t slot)
{
    if (!w->v[slot].touched) {
        w->v[slot].touched = 1;
        w->touched[w->ntouched++] = slot;    /* each slot once: ntouched <= cap */
    }
}

static void w_touch_addr(struct watch *w, uint16_t fam, u128 a)
{
    for (uint32_t i = w->heads[w_bucket(w, fam, a)]; i != NIL; i = w->v[i].next)
        if (w->v[i].addr == a && w->v[i].family == fam)
            w_mark(w, i);
}

static inline int w_prefix_has(uint16_t fam, u128 net, unsigned plen, u128 a)
{
    unsigned bits = fam_bits(fam);
    if (plen > bits)
        plen = bits;
    return prefix_of(net, bits, plen) == prefix_of(a, bits, plen);
}

/* Every slot a change of this SA record can matter to (registry.py's rule for SA events):
 * the latches whose peer is either end of the SA or within its selector. That names every
 * latch an SA can carry only for a transport SA between two given hosts; for any other (a
 * tunnel's SA names the gateways; an inbound SA with a wildcard source), the change is
 * flagged for the caller, who finds the latches on it by key. */
static void watch_sa(struct ipsecchan_xidx *x, const struct xsa *e,
                     struct ipsecchan_xidx_change *c)
{
    struct watch *w = &x->w;
    if (e->mode != XFRM_MODE_TRANSPORT || (e->flags & STATE_WILDRECV) || !famok(e->family) ||
        !e->src || !e->dst)
        c->unwatched = 1;
    if (!w->n || w->all)
        return;
    w_touch_addr(w, e->family, e->src);
    w_touch_addr(w, e->family, e->dst);
    const struct xfrm_usersa_info *in = SAI(e);
    if (!sel_other(in))
        return;
    uint16_t sf = in->sel.family;
    unsigned full = fam_bits(sf);
    if (famok(sf) && in->sel.prefixlen_s == full && in->sel.prefixlen_d == full) {
        w_touch_addr(w, sf, norm(sf, &in->sel.saddr));
        w_touch_addr(w, sf, norm(sf, &in->sel.daddr));
        return;
    }
    if (++w->scans > WATCH_SCANS) {
        w->all = 1;
        return;
    }
    for (uint32_t i = 0; i < w->cap; i++) {
        const struct wslot *s = &w->v[i];
        if (!s->used || s->touched || sf != s->family)
            continue;
        if (w_prefix_has(sf, norm(sf, &in->sel.daddr), in->sel.prefixlen_d, s->addr) ||
            w_prefix_has(sf, norm(sf, &in->sel.saddr), in->sel.prefixlen_s, s->addr))
            w_mark(w, i);
    }
}

static void watch_all(struct ipsecchan_xidx *x)
{
    if (x->w.n)
        x->w.all = 1;
}

static int w_rehash(struct ipsecchan_xidx *x, uint32_t nb)
{
    struct watch *w = &x->w;
    uint32_t *heads = xmalloc(x, (size_t)nb * sizeof *heads);
    if (!heads)
        return -1;
    xfree(x, w->heads);
    w->heads = heads;
    w->nb = nb;
    for (uint32_t b = 0; b < nb; b++)
        heads[b] = NIL;
    for (uint32_t i = 0; i < w->cap; i++)
        if (w->v[i].used)
            w_link(w, i);
    return 0;
}

int64_t ipsecchan_xidx_watch(struct ipsecchan_xidx *x, uint32_t slot, uint16_t family,
                             const char *addr)
{
    struct watch *w = &x->w;
    if (!famok(family) || slot >= UINT32_MAX / 4)
        return IPSECCHAN_XIDX_ESPACE;
    if (slot >= w->cap) {
        uint32_t cap = w->cap ? w->cap : 64;
        while (cap <= slot)
            cap *= 2;
        struct wslot *v = xrealloc(x, w->v, (size_t)cap * sizeof *v);
        if (!v)
            return IPSECCHAN_XIDX_ENOMEM;
        w->v = v;
        memset(v + w->cap, 0, (size_t)(cap - w->cap) * sizeof *v);
        uint32_t *t = xrealloc(x, w->touched, (size_t)cap * sizeof *t);
        if (!t)
            return IPSECCHAN_XIDX_ENOMEM;    /* (v grown, cap not: consistent) */
        w->touched = t;
        w->cap = cap;
    }
    if (!w->heads && w_rehash(x, MIN_BUCKETS))
        return IPSECCHAN_XIDX_ENOMEM;
    if (w->n >= w->nb && w_rehash(x, w->nb * 2))
        return IPSECCHAN_XIDX_ENOMEM;
    struct wslot *e = &w->v[slot];
    if (e->used)
        w_unlink(w, slot);
    else
        w->n++;
    e->used = 1;
    e->family = family;
    e->addr = load_be16((const uint8_t *)addr);
    if (family == AF_INET)
        e->addr &= 0xFFFFFFFFu;              /* as norm() reads an IPv4 address */
    w_link(w, slot);
    return 0;
}

void ipsecchan_xidx_unwatch(struct ipsecchan_xidx *x, uint32_t slot)
{
    struct watch *w = &x->w;
    if (slot < w->cap && w->v[slot].used) {
        w_unlink(w, slot);
        w->v[slot].used = 0;
        w->n--;
    }
}

int64_t ipsecchan_xidx_take_touched(struct ipsecchan_xidx *x, uint32_t *out, size_t cap)
{
    struct watch *w = &x->w;
    int64_t n = w->all ? -1 : (int64_t)w->ntouched;
    if (n > 0 && (size_t)n > cap)
        n = -1;                              /* no room: all of them, to be safe */
    for (uint32_t i = 0; i < w->ntouched; i++) {
        if (n > 0)
            out[i] = w->touched[i];
        w->v[w->touched[i]].touched = 0;
    }
    w->ntouched = 0;
    w->scans = 0;
    w->all = 0;
    return n;
}

size_t ipsecchan_xidx_watch_memory(const struct ipsecchan_xidx *x)
{
    return (size_t)x->w.cap * (sizeof *x->w.v + sizeof *x->w.touched) +
           (size_t)x->w.nb * sizeof *x->w.heads;
}

struct ipsecchan_xfollow {
    struct ipsecchan_xidx_follow *v;     /* by slot; tag 0: not followed */
    uint32_t cap;
};

struct ipsecchan_xfollow *ipsecchan_xfollow_new(void)
{
    return calloc(1, sizeof(struct ipsecchan_xfollow));
}

void ipsecchan_xfollow_free(struct ipsecchan_xfollow *t)
{
    if (t) {
        free(t->v);
        free(t);
    }
}

size_t ipsecchan_xfollow_memory(const struct ipsecchan_xfollow *t)
{
    return sizeof *t + (size_t)t->cap * sizeof *t->v;
}

int64_t ipsecchan_xfollow_set(struct ipsecchan_xfollow *t, uint32_t slot,
                              const struct ipsecchan_xidx_follow *f)
{
    if (f->nin > IPSECCHAN_XIDX_FOLLOW_IN)
        return IPSECCHAN_XIDX_ESPACE;
    if (slot >= t->cap) {
        if (slot >= UINT32_MAX / 2)
            return IPSECCHAN_XIDX_ESPACE;
        uint32_t cap = t->cap ? t->cap : 64;
        while (cap <= slot)
            cap *= 2;
        struct ipsecchan_xidx_follow *v = realloc(t->v, (size_t)cap * sizeof *v);
        if (!v)
            return IPSECCHAN_XIDX_ENOMEM;
        memset(v + t->cap, 0, (size_t)(cap - t->cap) * sizeof *v);
        t->v = v;
        t->cap = cap;
    }
    t->v[slot] = *f;
    return 0;
}

int64_t ipsecchan_xfollow_get(const struct ipsecchan_xfollow *t, uint32_t slot,
                              struct ipsecchan_xidx_follow *out)
{
    if (slot >= t->cap)
        return -1;
    *out = t->v[slot];
    return 0;
}

void ipsecchan_xfollow_drop(struct ipsecchan_xfollow *t, uint32_t slot)
{
    if (slot < t->cap)
        t->v[slot].tag = 0;
}

static inline void store_be16(char *p, u128 v)
{
    uint64_t hi = __builtin_bswap64((uint64_t)(v >> 64)), lo = __builtin_bswap64((uint64_t)v);
    memcpy(p, &hi, 8);
    memcpy(p + 8, &lo, 8);
}

static inline int same_key(const struct xsa *e, const struct ipsecchan_xidx_sakey *k)
{
    return e->family == k->family && e->proto == k->proto && e->spi == k->spi &&
           e->dst == load_be16((const uint8_t *)k->dst);
}

static inline void key_of(const struct xsa *e, struct ipsecchan_xidx_sakey *k)
{
    memset(k, 0, sizeof *k);
    store_be16(k->dst, e->dst);
    k->spi = e->spi;
    k->reqid = e->reqid;
    k->family = e->family;
    k->proto = e->proto;
}

/* One followed flow against the index now (see the header for the codes). */
static uint8_t judge_follow(struct ipsecchan_xidx_follow *f, const struct ipsecchan_xidx *x,
                            unsigned defaults, uint64_t *hs, uint8_t *nhs)
{
    enum { CAP = 2 * 4 + 1 + IPSECCHAN_XIDX_FOLLOW_IN };
    uint64_t w[CAP];
    const struct xsa *sas[1 + IPSECCHAN_XIDX_FOLLOW_IN];
    *nhs = 0;
    if (!f->tag)
        return IPSECCHAN_XIDX_SLOW;
    const struct ipsecchan_xidx_flow *fl = &f->flow;
    int64_t n = ipsecchan_xidx_lookup_flow(x, fl->family, fl->proto, fl->local, fl->local_port,
                                           fl->remote, fl->remote_port, fl->mark, fl->ifindex,
                                           fl->if_id, defaults, w, CAP);
    /* One OUT SA, 1..FOLLOW_IN IN SAs, both protected, no cleartext accepted inbound:
     * anything else is the full judgement's. */
    if (n < 9 || n > CAP || w[0] != IPSECCHAN_XIDX_PROTECTED || w[3] != 1)
        return IPSECCHAN_XIDX_SLOW;
    uint64_t nin = w[8];
    if (w[5] != IPSECCHAN_XIDX_PROTECTED || (w[7] & 2) || nin < 1 ||
        nin > IPSECCHAN_XIDX_FOLLOW_IN || (uint64_t)n != 9 + nin)
        return IPSECCHAN_XIDX_SLOW;
    uint32_t nsa = (uint32_t)(1 + nin);
    hs[0] = w[4];
    for (uint32_t i = 0; i < nin; i++)
        hs[1 + i] = w[9 + i];
    int need = 0;
    for (uint32_t i = 0; i < nsa; i++) {
        sas[i] = (const struct xsa *)resolve(&x->sa, hs[i]);
        if (!sas[i])
            return IPSECCHAN_XIDX_SLOW;
        if (sas[i]->tag == 0)
            need = 1;
        else if (sas[i]->tag != f->tag)
            return IPSECCHAN_XIDX_SLOW;         /* another class: another peer, say */
    }
    if (need) {
        uint8_t k = 0;
        for (uint32_t i = 0; i < nsa; i++)
            if (sas[i]->tag == 0)
                hs[k++] = hs[i];
        *nhs = k;
        return IPSECCHAN_XIDX_NEED;
    }
    int same = same_key(sas[0], &f->out) && nin == f->nin;
    for (uint32_t i = 0; same && i < nin; i++)
        same = same_key(sas[1 + i], &f->in[i]);
    if (same)
        return IPSECCHAN_XIDX_KEEP;
    uint8_t code = same_key(sas[0], &f->out) && sas[0]->reqid == f->out.reqid
                       ? IPSECCHAN_XIDX_INBOUND : IPSECCHAN_XIDX_MOVED;
    key_of(sas[0], &f->out);
    for (uint32_t i = 0; i < nin; i++)
        key_of(sas[1 + i], &f->in[i]);
    f->nin = (uint32_t)nin;
    *nhs = (uint8_t)nsa;
    return code;
}

int64_t ipsecchan_xfollow_revalidate(struct ipsecchan_xfollow *t,
                                     const struct ipsecchan_xidx *x, const uint32_t *slots,
                                     size_t n, unsigned defaults, uint8_t *codes,
                                     uint8_t *nsas, uint64_t *handles)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t slot = slots[i];
        nsas[i] = 0;
        codes[i] = slot < t->cap
            ? judge_follow(&t->v[slot], x, defaults,
                           handles + i * (1 + IPSECCHAN_XIDX_FOLLOW_IN), &nsas[i])
            : IPSECCHAN_XIDX_SLOW;
    }
    return 0;
}

void ipsecchan_xidx_set_tags(struct ipsecchan_xidx *x, const uint64_t *handles,
                             const uint32_t *tags, size_t n, uint8_t *done)
{
    for (size_t i = 0; i < n; i++)
        done[i] = ipsecchan_xidx_sa_set_tag(x, handles[i], tags[i]) == 0;
}
