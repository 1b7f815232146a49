"""The C netlink walker and the C SAD/SPD index under AddressSanitizer: random and hostile
input, each in a malloc block of its exact size, so a read one byte past the end is caught.
A control run proves the harness does catch such a read. The index is fed the seed corpus
(tests/corpus/xfrm, made by tests/corpus/make_corpus.py) and random mutations of it, with
lookups and full views after every apply."""
import os
import subprocess
import sys

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

BUILD = r"""
import sys
from cffi import FFI
ffi = FFI()
ffi.cdef('''
struct ipsecchan_nlspan { uint32_t offset; uint32_t len; uint16_t type; uint16_t flags;
                          uint32_t seq; uint32_t pid; };
struct ipsecchan_attrspan { uint32_t offset; uint32_t len; uint16_t type; uint16_t flags; };
int ipsecchan_nl_split(const uint8_t *, size_t, struct ipsecchan_nlspan *, size_t, size_t *);
int ipsecchan_nla_split(const uint8_t *, size_t, struct ipsecchan_attrspan *, size_t, size_t *);
void *malloc(size_t); void free(void *);
int overread_for_control(const uint8_t *b, size_t n);
struct ipsecchan_xidx;
struct ipsecchan_xidx *ipsecchan_xidx_new(void);
void ipsecchan_xidx_free(struct ipsecchan_xidx *);
void ipsecchan_xidx_clear(struct ipsecchan_xidx *);
int64_t ipsecchan_xidx_apply(struct ipsecchan_xidx *, const uint8_t *, size_t, double, size_t *,
                             int64_t *);
size_t ipsecchan_xidx_sa_count(const struct ipsecchan_xidx *);
size_t ipsecchan_xidx_policy_count(const struct ipsecchan_xidx *);
size_t ipsecchan_xidx_memory(const struct ipsecchan_xidx *);
size_t ipsecchan_xidx_sa_handles(const struct ipsecchan_xidx *, uint64_t *, size_t);
size_t ipsecchan_xidx_policy_handles(const struct ipsecchan_xidx *, uint64_t *, size_t);
const uint8_t *ipsecchan_xidx_sa_message(const struct ipsecchan_xidx *, uint64_t, size_t *);
struct ipsecchan_xidx_change { uint64_t handle; uint64_t old_handle; uint32_t offset;
    uint32_t len; uint32_t spi; uint16_t type; uint16_t family; uint8_t proto; uint8_t hard;
    uint8_t has_src; uint8_t unwatched; char dst[16]; char src[16]; };
int64_t ipsecchan_xidx_apply_report(struct ipsecchan_xidx *, const uint8_t *, size_t, double,
                                    size_t *, int64_t *, struct ipsecchan_xidx_change *,
                                    size_t, size_t *);
struct ipsecchan_xidx_sainfo { uint64_t add_time; uint32_t spi; uint32_t reqid;
    uint32_t prot_len; uint16_t family; uint8_t proto; uint8_t mode; uint8_t flags;
    uint8_t dying; uint8_t encap; uint8_t sel_other; char dst[16]; char src[16]; };
int64_t ipsecchan_xidx_sa_info(const struct ipsecchan_xidx *, uint64_t,
                               struct ipsecchan_xidx_sainfo *, uint8_t *, size_t);
const uint8_t *ipsecchan_xidx_policy_message(const struct ipsecchan_xidx *, uint64_t, size_t *);
int64_t ipsecchan_xidx_lookup(const struct ipsecchan_xidx *, uint16_t, uint8_t, const char *,
                              uint16_t, const char *, uint16_t, uint32_t, int32_t, uint32_t,
                              const char *, size_t, const char *, size_t, unsigned, uint64_t *,
                              size_t);
struct ipsecchan_xidx_flow { char local[16]; char remote[16]; uint32_t mark; uint32_t if_id;
    int32_t ifindex; uint16_t family; uint16_t local_port; uint16_t remote_port;
    uint8_t proto; };
int64_t ipsecchan_xidx_sa_set_tag(struct ipsecchan_xidx *, uint64_t, uint32_t);
uint32_t ipsecchan_xidx_sa_tag(const struct ipsecchan_xidx *, uint64_t);
void ipsecchan_xidx_clear_tags(struct ipsecchan_xidx *);
void ipsecchan_xidx_set_tags(struct ipsecchan_xidx *, const uint64_t *, const uint32_t *, size_t,
                             uint8_t *);
struct ipsecchan_xidx_sakey { char dst[16]; uint32_t spi; uint32_t reqid; uint16_t family;
    uint8_t proto; uint8_t pad; };
struct ipsecchan_xidx_follow { struct ipsecchan_xidx_flow flow; uint32_t tag; uint32_t nin;
    struct ipsecchan_xidx_sakey out; struct ipsecchan_xidx_sakey in[3]; };
struct ipsecchan_xfollow;
struct ipsecchan_xfollow *ipsecchan_xfollow_new(void);
void ipsecchan_xfollow_free(struct ipsecchan_xfollow *);
size_t ipsecchan_xfollow_memory(const struct ipsecchan_xfollow *);
int64_t ipsecchan_xfollow_set(struct ipsecchan_xfollow *, uint32_t,
                              const struct ipsecchan_xidx_follow *);
int64_t ipsecchan_xfollow_get(const struct ipsecchan_xfollow *, uint32_t,
                              struct ipsecchan_xidx_follow *);
void ipsecchan_xfollow_drop(struct ipsecchan_xfollow *, uint32_t);
int64_t ipsecchan_xfollow_revalidate(struct ipsecchan_xfollow *, const struct ipsecchan_xidx *,
                                     const uint32_t *, size_t, unsigned, uint8_t *, uint8_t *,
                                     uint64_t *);
int64_t ipsecchan_xidx_watch(struct ipsecchan_xidx *, uint32_t, uint16_t, const char *);
void ipsecchan_xidx_unwatch(struct ipsecchan_xidx *, uint32_t);
int64_t ipsecchan_xidx_take_touched(struct ipsecchan_xidx *, uint32_t *, size_t);
size_t ipsecchan_xidx_watch_memory(const struct ipsecchan_xidx *);
''')
ffi.set_source("_nlmsg_asan", '''
#include <stdlib.h>
#include "nlmsg.h"
#include "xfrm_index.h"
/* Only in this test build: a deliberate one-byte overread, to show ASan is watching. */
int overread_for_control(const uint8_t *b, size_t n) { return b[n]; }
''', sources=[sys.argv[2] + "/nlmsg.c", sys.argv[2] + "/xfrm_index.c"], include_dirs=[sys.argv[2]],
    extra_compile_args=["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1",
                        "-std=c11"],
    extra_link_args=["-fsanitize=address"])
ffi.compile(tmpdir=sys.argv[1])
"""

FUZZ = r"""
import random, struct, sys
sys.path.insert(0, sys.argv[1])
from _nlmsg_asan import ffi, lib
alloc = ffi.new_allocator(alloc=lib.malloc, free=lib.free, should_clear_after_alloc=False)
if sys.argv[2] == "control":
    buf = alloc("uint8_t[]", 8)
    lib.overread_for_control(buf, 8)
    sys.exit(0)
rnd = random.Random(5660)
def candidates():
    for _ in range(30000):
        n = rnd.randrange(0, 200)
        data = bytearray(rnd.randrange(256) for _ in range(n))
        # Plausible headers too, with lengths near the edges, so the walker goes deep.
        off = 0
        while off + 16 <= n and rnd.random() < 0.7:
            ln = rnd.choice([16, 17, 20, n - off, n - off + 1, n - off + 4, 0xFFFF, 3])
            struct.pack_into("=I", data, off, ln & 0xFFFFFFFF)
            if off + 4 <= n and rnd.random() < 0.5:
                struct.pack_into("=H", data, off, ln & 0xFFFF)
            off += max(4, (ln + 3) & ~3)
        yield bytes(data)
runs = 0
for data in candidates():
    n = len(data)
    buf = alloc("uint8_t[]", max(n, 1))
    ffi.memmove(buf, data, n)
    cap = max(1, n // 4)
    bad = ffi.new("size_t *")
    r1 = lib.ipsecchan_nl_split(buf, n, ffi.new("struct ipsecchan_nlspan[]", cap), cap, bad)
    r2 = lib.ipsecchan_nla_split(buf, n, ffi.new("struct ipsecchan_attrspan[]", cap), cap, bad)
    assert r1 >= -4 and r2 >= -4
    runs += 1
print("fuzzed", runs)
"""


CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "xfrm")

FUZZ_INDEX = r"""
import os, random, struct, sys
sys.path.insert(0, sys.argv[1])
from _nlmsg_asan import ffi, lib
alloc = ffi.new_allocator(alloc=lib.malloc, free=lib.free, should_clear_after_alloc=False)
corpus_dir = sys.argv[3]
seeds, sockpols = [], []
for name in sorted(os.listdir(corpus_dir)):
    with open(os.path.join(corpus_dir, name), "rb") as f:
        (sockpols if name.startswith("sockpol-") else seeds).append(f.read())
assert len(seeds) >= 20, "seed corpus missing: run tests/corpus/make_corpus.py"
# A protected transport world and its rekeys (well-formed), applied now and then so that
# followed flows find protected paths: the deep end of revalidation.
world = []
if len(sys.argv) > 4:
    with open(sys.argv[4], "rb") as f:
        blob = f.read()
    while blob:
        n = struct.unpack_from("=I", blob)[0]
        world.append(blob[4:4 + n])
        blob = blob[4 + n:]
rnd = random.Random(5660)
ADDRS = [bytes(12) + bytes([10, 0, 0, 1]), bytes(12) + bytes([10, 0, 0, 2]), bytes(16),
         bytes([0xfd]) + bytes(14) + b"\1", bytes([0xfd]) + bytes(14) + b"\2"]

def exact(data):
    buf = alloc("uint8_t[]", max(len(data), 1))
    ffi.memmove(buf, data, len(data))
    return buf

def mutate(data):
    data = bytearray(data)
    for _ in range(rnd.choice([1, 1, 2, 4])):
        k = rnd.randrange(6)
        pos = rnd.randrange(len(data)) if data else 0
        if k == 0 and data:
            data[pos] = rnd.randrange(256)
        elif k == 1:
            del data[pos:]
        elif k == 2 and pos + 2 <= len(data):
            struct.pack_into("=H", data, pos, rnd.choice([0, 3, 4, 5, 8, 0xFFFF, len(data) - pos]))
        elif k == 3 and pos + 4 <= len(data):
            struct.pack_into("=I", data, pos, rnd.choice([0, 15, 16, 17, 0xFFFFFFFF,
                                                          len(data) - pos, len(data) - pos + 4]))
        elif k == 4:
            data += rnd.choice(seeds)
        else:
            data[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 9)))
    return bytes(data)

def views(x):
    for count, handles, message in (
            (lib.ipsecchan_xidx_sa_count, lib.ipsecchan_xidx_sa_handles,
             lib.ipsecchan_xidx_sa_message),
            (lib.ipsecchan_xidx_policy_count, lib.ipsecchan_xidx_policy_handles,
             lib.ipsecchan_xidx_policy_message)):
        n = count(x)
        hs = ffi.new("uint64_t[]", n + 1)
        assert handles(x, hs, n + 1) == n
        ln = ffi.new("size_t *")
        for i in range(n):
            p = message(x, hs[i], ln)
            assert p != ffi.NULL
            bytes(ffi.buffer(p, ln[0]))       # touch every byte
            if message is lib.ipsecchan_xidx_sa_message:
                info = ffi.new("struct ipsecchan_xidx_sainfo *")
                cap = rnd.choice([0, 8, 512])
                prot = alloc("uint8_t[]", max(cap, 1))
                assert lib.ipsecchan_xidx_sa_info(x, hs[i], info, prot, cap) == 0
                assert info.prot_len <= ln[0]
        # a stale handle answers -1
        info = ffi.new("struct ipsecchan_xidx_sainfo *")
        assert lib.ipsecchan_xidx_sa_info(x, (1 << 63) | 5, info, ffi.NULL, 0) == -1

def lookups(x, k):
    out = ffi.new("uint64_t[]", 64)
    for _ in range(k):
        fam = rnd.choice([2, 10, 2, 0])
        sock = [ffi.NULL, 0, ffi.NULL, 0]
        if rnd.random() < 0.3:
            sp = rnd.choice(sockpols)
            if rnd.random() < 0.3:
                sp = sp[:rnd.randrange(len(sp))]
            b = exact(sp)
            sock[rnd.choice([0, 2])], sock[1] = b, len(sp)
            sock[3] = len(sp) if sock[2] != ffi.NULL else 0
            if sock[0] == ffi.NULL:
                sock[1] = 0
        local, remote = exact(rnd.choice(ADDRS)), exact(rnd.choice(ADDRS))
        n = lib.ipsecchan_xidx_lookup(x, fam, rnd.choice([6, 17]), ffi.cast("char *", local),
                                      rnd.choice([0, 22, 1000]), ffi.cast("char *", remote),
                                      rnd.choice([0, 22, 443]), rnd.choice([0, 1]), 0,
                                      rnd.choice([0, 3]), ffi.cast("char *", sock[0]), sock[1],
                                      ffi.cast("char *", sock[2]), sock[3], rnd.randrange(4),
                                      out, rnd.choice([0, 3, 64]))
        assert n >= -200

def sa_handles(x):
    n = lib.ipsecchan_xidx_sa_count(x)
    hs = ffi.new("uint64_t[]", n + 1)
    return list(ffi.unpack(hs, lib.ipsecchan_xidx_sa_handles(x, hs, n + 1)))

CODES = [0] * 5
def follows(x, t):
    # Tags on current and stale handles, followed flows in random slots (keys of real SAs
    # and random ones, too many inbound SAs, absurd slots), and revalidation of slots in
    # and out of the table, every array of its exact size.
    hs = sa_handles(x)
    stale = [(1 << 63) | 5, 0, (hs[0] + (1 << 32)) if hs else 7]
    for h in rnd.sample(hs, min(len(hs), 4)) + stale:
        tag = rnd.choice([0, 1, 2, 3, 0xFFFF, 0x10000])
        r = lib.ipsecchan_xidx_sa_set_tag(x, h, tag)
        assert r in (0, -1)
        assert r == -1 or lib.ipsecchan_xidx_sa_tag(x, h) == tag
    pick = rnd.sample(hs, min(len(hs), 3)) + stale[:1]
    n = len(pick)
    handles, tags, done = alloc("uint64_t[]", n), alloc("uint32_t[]", n), alloc("uint8_t[]", n)
    for i, h in enumerate(pick):
        handles[i], tags[i] = h, rnd.choice([1, 2])
    lib.ipsecchan_xidx_set_tags(x, handles, tags, n, done)
    assert done[n - 1] == 0
    info = ffi.new("struct ipsecchan_xidx_sainfo *")
    words = ffi.new("uint64_t[]", 64)
    for _ in range(6):
        e = ffi.new("struct ipsecchan_xidx_follow *")
        f = e.flow
        f.local, f.remote = rnd.choice(ADDRS), rnd.choice(ADDRS)
        f.family, f.proto = rnd.choice([2, 10, 0]), rnd.choice([6, 17])
        f.local_port, f.remote_port = rnd.choice([0, 22, 1000]), rnd.choice([0, 22, 443])
        f.mark, f.if_id = rnd.choice([0, 1]), rnd.choice([0, 3])
        # Mostly flows the index protects (so revalidation goes past its first checks).
        for _ in range(20):
            got = lib.ipsecchan_xidx_lookup(x, f.family, f.proto, f.local, f.local_port,
                                            f.remote, f.remote_port, f.mark, 0, f.if_id,
                                            ffi.NULL, 0, ffi.NULL, 0, 0, words, 64)
            if got >= 9 and words[0] == 0 or rnd.random() < 0.1:
                break
            f.local, f.remote = rnd.choice(ADDRS), rnd.choice(ADDRS)
            f.family = rnd.choice([2, 10])
        e.tag = rnd.choice([0, 1, 2])
        e.nin = rnd.choice([0, 1, 2, 3, 4, 0xFFFFFFFF])
        keys = [e.out] + [getattr(e, "in")[i] for i in range(3)]
        for k in keys:
            if hs and rnd.random() < 0.7 and \
                    lib.ipsecchan_xidx_sa_info(x, rnd.choice(hs), info, ffi.NULL, 0) == 0:
                k.dst, k.spi, k.family, k.proto = info.dst, info.spi, info.family, info.proto
            else:
                k.dst, k.spi = rnd.choice(ADDRS), rnd.randrange(1 << 32)
                k.family, k.proto = rnd.choice([2, 10]), 50
        slot = rnd.choice([0, 1, 2, 7, 63, 64, 65, 300, 0xFFFFFFFF, 0x80000000])
        r = lib.ipsecchan_xfollow_set(t, slot, e)
        assert r in (0, -106) and (r == -106) == (e.nin > 3 or slot >= 0x7FFFFFFF)
        got = ffi.new("struct ipsecchan_xidx_follow *")
        assert lib.ipsecchan_xfollow_get(t, slot, got) == (0 if r == 0 else -1) or r != 0
    if rnd.random() < 0.2:
        lib.ipsecchan_xfollow_drop(t, rnd.choice([0, 1, 5000, 0xFFFFFFFF]))
    slots = [rnd.choice([0, 1, 2, 7, 63, 64, 65, 300, 301, 0xFFFFFFFF])
             for _ in range(rnd.randrange(0, 9))]
    n = len(slots)
    s_arr = alloc("uint32_t[]", max(n, 1))
    for i, sl in enumerate(slots):
        s_arr[i] = sl
    codes, nsas = alloc("uint8_t[]", max(n, 1)), alloc("uint8_t[]", max(n, 1))
    out = alloc("uint64_t[]", max(n * 4, 1))
    assert lib.ipsecchan_xfollow_revalidate(t, x, s_arr, n, rnd.randrange(4), codes, nsas,
                                            out) == 0
    for i in range(n):
        assert codes[i] <= 4 and nsas[i] <= 4
        CODES[codes[i]] += 1
    if rnd.random() < 0.05:
        lib.ipsecchan_xidx_clear_tags(x)
    assert lib.ipsecchan_xfollow_memory(t) > 0

WATCHED = {}
TOUCHED = [0, 0]
def watches(x):
    # Watched slots (peers of real SAs and random ones, both families, absurd slots and
    # families), unwatched at random; the marks taken into arrays of exact size, of the
    # largest slot watched, and too small.
    hs = sa_handles(x)
    info = ffi.new("struct ipsecchan_xidx_sainfo *")
    for _ in range(rnd.randrange(3)):
        slot = rnd.choice([0, 1, 2, 63, 64, 65, 200, 0x3FFFFFFF, 0xFFFFFFFF])
        fam = rnd.choice([2, 10, 2, 10, 0, 1])
        addr = rnd.choice(ADDRS)
        if hs and rnd.random() < 0.7 and \
                lib.ipsecchan_xidx_sa_info(x, rnd.choice(hs), info, ffi.NULL, 0) == 0:
            fam, addr = info.family, ffi.buffer(rnd.choice([info.src, info.dst]), 16)[:]
        a = alloc("char[]", 16)
        ffi.memmove(a, addr, 16)
        r = lib.ipsecchan_xidx_watch(x, slot, fam, a)
        assert r in (0, -106) and (r == -106) == (fam not in (2, 10) or slot >= 0x3FFFFFFF)
        if r == 0:
            WATCHED[slot] = True
    if WATCHED and rnd.random() < 0.3:
        slot = rnd.choice(list(WATCHED))
        lib.ipsecchan_xidx_unwatch(x, slot)
        del WATCHED[slot]
    lib.ipsecchan_xidx_unwatch(x, rnd.choice([5000, 0xFFFFFFFF]))
    if rnd.random() < 0.5:
        top = max(WATCHED, default=-1) + 1
        cap = rnd.choice([top, top, max(top - 1, 0), 1])
        out = alloc("uint32_t[]", max(cap, 1))
        n = lib.ipsecchan_xidx_take_touched(x, out, cap)
        assert n == -1 or (0 <= n <= cap and all(out[i] < 0x3FFFFFFF for i in range(n)))
        TOUCHED[0] += n > 0
        TOUCHED[1] += n == -1
    assert lib.ipsecchan_xidx_watch_memory(x) >= 0

x = lib.ipsecchan_xidx_new()
t = lib.ipsecchan_xfollow_new()
bad = ffi.new("size_t *"); applied = ffi.new("int64_t *")
runs = applied_ok = rejected = peak = 0
def clean(data):
    probe = lib.ipsecchan_xidx_new()
    ok = lib.ipsecchan_xidx_apply(probe, exact(data), len(data), 1.7e9, ffi.new("size_t *"),
                                  ffi.new("int64_t *")) >= 0
    lib.ipsecchan_xidx_free(probe)
    return ok
valid = [d for d in seeds if clean(d)]
assert len(valid) >= 10 and len(seeds) - len(valid) >= 10, (len(valid), len(seeds))
def mix():
    return b"".join(rnd.choice(valid if rnd.random() < 0.9 else seeds)
                    for _ in range(rnd.randrange(1, 5)))
inputs = list(seeds) + [mutate(mix()) if rnd.random() < 0.6 else mix() for _ in range(8000)]
nchanges = ffi.new("size_t *")
for i, data in enumerate(inputs):
    buf = exact(data)
    if i % 2:
        # The reporting variant, its change array exactly as long as len / 16 + 1.
        cap = len(data) // 16 + 1
        changes = alloc("struct ipsecchan_xidx_change[]", cap)
        r = lib.ipsecchan_xidx_apply_report(x, buf, len(data), 1.7e9, bad, applied, changes,
                                            cap, nchanges)
        assert r != -106 and nchanges[0] <= cap
        for c in range(nchanges[0]):
            assert changes[c].offset + changes[c].len <= len(data)
    else:
        r = lib.ipsecchan_xidx_apply(x, buf, len(data), 1.7e9, bad, applied)
    assert r >= 0 or bad[0] <= len(data), (r, bad[0], len(data))
    applied_ok += r > 0
    rejected += r < 0
    peak = max(peak, lib.ipsecchan_xidx_sa_count(x) + lib.ipsecchan_xidx_policy_count(x))
    if world and i % 7 == 0:
        for w in rnd.sample(world, rnd.randrange(1, len(world) + 1)):
            lib.ipsecchan_xidx_apply(x, exact(w), len(w), 1.7e9, bad, applied)
    lookups(x, 3)
    follows(x, t)
    watches(x)
    if i % 50 == 0:
        views(x)
    if i % 500 == 499:
        lib.ipsecchan_xidx_clear(x)
    runs += 1
views(x)
lib.ipsecchan_xidx_free(x)
lib.ipsecchan_xfollow_free(t)
print("index fuzzed", runs, "applied", applied_ok, "rejected", rejected, "peak", peak,
      "follow", *CODES, "touched", *TOUCHED)
"""


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.fail("gcc has no libasan.so: install libasan (Debian: gcc's libasan8)")
    out = tmp_path_factory.mktemp("asan")
    subprocess.run([sys.executable, "-c", BUILD, str(out), CSRC], check=True,
                   capture_output=True)
    return out, libasan


def _run(asan_build, mode, script=None, *extra):
    out, libasan = asan_build
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", script or FUZZ, str(out), mode, CORPUS,
                           *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def test_asan_catches_an_overread(asan_build):
    r = _run(asan_build, "control")
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr


def test_walker_never_reads_out_of_bounds(asan_build):
    r = _run(asan_build, "fuzz")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fuzzed 30000" in r.stdout


def _world(path):
    # 10.0.0.1 <-> 10.0.0.2 (and fd00::1 <-> fd00::2) in ESP transport mode, reqid 1: the
    # policies, an SA each way, then rekeys (new SAs, old ones deleted), length-prefixed.
    from ipsecchan.xfrm import encode
    from ipsecchan.xfrm.messages import SA, Algorithm, Lifetime, Policy, Selector, Template
    inf = (1 << 64) - 1
    msgs = []
    for fam, a, b in ((2, "10.0.0.1", "10.0.0.2"), (10, "fd00::1", "fd00::2")):
        full = 32 if fam == 2 else 128

        def sel(s, d):
            return Selector(fam, s, d, full, full, 0, 0, 0, 0, 0, 0)

        def sa(s, d, spi):
            return SA(s, d, fam, "esp", spi, 1, "transport", 0, 32, sel(s, d), 0, 0, 1000 + spi,
                      0, (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),), None, None,
                      None, True, None, Lifetime(inf, inf, inf, inf, 0, 0, 0, 0), (0, 0), None)
        t = (Template(fam, "", "", "esp", 0, 1, "transport", False),)
        msgs += [encode.newpolicy(Policy("out", "allow", 100, 1 + fam, sel(a, b), t, None,
                                         None, None)),
                 encode.newpolicy(Policy("in", "allow", 100, 8 + fam * 8, sel(b, a), t,
                                         None, None, None))]
        for spi in range(0x100, 0x106):
            msgs += [encode.newsa(sa(a, b, spi)), encode.newsa(sa(b, a, spi + 0x1000)),
                     encode.delsa(sa(a, b, spi - 1)), encode.delsa(sa(b, a, spi + 0xfff))]
    with open(path, "wb") as f:
        for m in msgs:
            f.write(len(m).to_bytes(4, sys.byteorder) + m)
    return path


def test_index_never_reads_out_of_bounds(asan_build, tmp_path):
    r = _run(asan_build, "index", FUZZ_INDEX, _world(str(tmp_path / "world.bin")))
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[:2] == ["index", "fuzzed"], r.stdout
    # the mutations reach both sides: accepted messages that fill the index, and rejections
    assert int(words[4]) > 3000 and int(words[6]) > 1000 and int(words[8]) >= 8, r.stdout
    # revalidation of followed flows ran, and got past its first checks (KEEP, MOVED or
    # INBOUND, NEED: lookups that found a protected single-SA path) as well as SLOW
    codes = [int(w) for w in words[10:15]]
    assert words[9] == "follow" and codes[4] > 1000 and sum(codes[:4]) > 0, r.stdout
    # watched slots were marked by SA changes (some takes named slots, some every slot)
    assert words[15] == "touched" and int(words[16]) > 0 and int(words[17]) > 0, r.stdout
