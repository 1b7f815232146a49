"""The C netlink walker under AddressSanitizer: random and hostile input, each in a malloc
block of its exact size, so a read one byte past the end is caught. A control run proves
the harness does catch such a read."""
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
''')
ffi.set_source("_nlmsg_asan", '''
#include <stdlib.h>
#include "nlmsg.h"
/* Only in this test build: a deliberate one-byte overread, to show ASan is watching. */
int overread_for_control(const uint8_t *b, size_t n) { return b[n]; }
''', sources=[sys.argv[2] + "/nlmsg.c"], include_dirs=[sys.argv[2]],
    extra_compile_args=["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"],
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


def _run(asan_build, mode):
    out, libasan = asan_build
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", FUZZ, str(out), mode], env=env,
                          capture_output=True, text=True, timeout=600)


def test_asan_catches_an_overread(asan_build):
    r = _run(asan_build, "control")
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr


def test_walker_never_reads_out_of_bounds(asan_build):
    r = _run(asan_build, "fuzz")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fuzzed 30000" in r.stdout
