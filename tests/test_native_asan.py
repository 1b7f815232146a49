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
    uint8_t has_src; uint8_t pad; char dst[16]; char src[16]; };
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

x = lib.ipsecchan_xidx_new()
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
    lookups(x, 3)
    if i % 50 == 0:
        views(x)
    if i % 500 == 499:
        lib.ipsecchan_xidx_clear(x)
    runs += 1
views(x)
lib.ipsecchan_xidx_free(x)
print("index fuzzed", runs, "applied", applied_ok, "rejected", rejected, "peak", peak)
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


def _run(asan_build, mode, script=None):
    out, libasan = asan_build
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", script or FUZZ, str(out), mode, CORPUS],
                          env=env, capture_output=True, text=True, timeout=600)


def test_asan_catches_an_overread(asan_build):
    r = _run(asan_build, "control")
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr


def test_walker_never_reads_out_of_bounds(asan_build):
    r = _run(asan_build, "fuzz")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fuzzed 30000" in r.stdout


def test_index_never_reads_out_of_bounds(asan_build):
    r = _run(asan_build, "index", FUZZ_INDEX)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    assert words[:2] == ["index", "fuzzed"], r.stdout
    # the mutations reach both sides: accepted messages that fill the index, and rejections
    assert int(words[4]) > 3000 and int(words[6]) > 1000 and int(words[8]) >= 8, r.stdout
