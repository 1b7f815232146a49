"""The user-mode-linux register shim (ipsecchan/lab/uml_xstate.c), on the host: its ptrace()
called directly on a stopped child, as UML calls it, with UML's 832-byte buffers."""
import ctypes
import os
import platform
import signal
import tempfile

import pytest

from ipsecchan.lab import kernel

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or os.geteuid() != 0,
                                reason="x86 XSAVE state, ptrace of a child (root)")

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
GETREGSET, SETREGSET, NT_X86_XSTATE = 0x4204, 0x4205, 0x202
UML_BUFFER = 832          # sizeof(struct _xstate): x87, SSE, XSAVE header, AVX
XSTATE_BV = slice(512, 520)


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def regset(fn, request, pid, buf, length):
    iov = IoVec(ctypes.addressof(buf), length)
    ctypes.set_errno(0)
    r = fn(request, pid, NT_X86_XSTATE, ctypes.byref(iov))
    return r, ctypes.get_errno(), iov.len


@pytest.fixture
def stopped_child():
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    try:
        assert libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0
        os.waitpid(pid, 0)
        yield pid, libc.ptrace
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture
def shim_ptrace():
    with tempfile.TemporaryDirectory() as d:
        lib = ctypes.CDLL(kernel._build_xstate_shim(d), use_errno=True)
        fn = lib.ptrace
        fn.restype = ctypes.c_long
        fn.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        yield fn


def host_size(real, pid):
    whole = ctypes.create_string_buffer(65536)
    r, err, size = regset(real, GETREGSET, pid, whole, len(whole))
    assert r == 0, os.strerror(err)
    return whole, size


def test_uml_sized_registers_round_trip_through_the_shim_without_loss(stopped_child, shim_ptrace):
    pid, real = stopped_child
    before, size = host_size(real, pid)
    uml = ctypes.create_string_buffer(UML_BUFFER)
    r, err, got = regset(shim_ptrace, GETREGSET, pid, uml, UML_BUFFER)
    assert r == 0 and got == min(UML_BUFFER, size)
    assert uml.raw[:got] == before.raw[:got]
    if size > UML_BUFFER:
        # What the shim is for: the host refuses UML's short SET...
        r, err, _ = regset(real, SETREGSET, pid, uml, UML_BUFFER)
        assert r == -1 and err == 14
    # ...and through the shim it goes in, the registers beyond UML's buffer kept.
    uml.raw = bytes(uml.raw[:XSTATE_BV.start]) + before.raw[XSTATE_BV.start:UML_BUFFER]
    r, err, _ = regset(shim_ptrace, SETREGSET, pid, uml, UML_BUFFER)
    assert r == 0, os.strerror(err)
    after, _ = host_size(real, pid)
    assert after.raw[:size] == before.raw[:size]


def test_a_buffer_never_read_sets_the_rest_to_its_initial_state(stopped_child, shim_ptrace):
    pid, real = stopped_child
    before, size = host_size(real, pid)
    if size <= UML_BUFFER:
        pytest.skip("this CPU's XSAVE area fits UML's buffer")
    fresh = ctypes.create_string_buffer(before.raw[:UML_BUFFER], UML_BUFFER)
    r, err, _ = regset(shim_ptrace, SETREGSET, pid, fresh, UML_BUFFER)
    assert r == 0, os.strerror(err)
    after, _ = host_size(real, pid)
    assert after.raw[:XSTATE_BV.start] == before.raw[:XSTATE_BV.start]
    bv = int.from_bytes(after.raw[XSTATE_BV], "little")
    # AVX-512 (opmask, upper ZMM halves, ZMM16-31) and AMX back to their initial state; the
    # host always reports PKRU.
    assert bv & ~0x7 & ~(1 << 9) == 0, hex(bv)


def test_a_guest_that_died_of_it_is_diagnosed_from_its_whole_console(tmp_path):
    # The line that says why is above the panic's trace, which fills the console's tail.
    console = tmp_path / "console.log"
    console.write_text("booting\nuserspace - ptrace set fp regs failed, errno = 14\n"
                       "Kernel panic - not syncing: Attempted to kill init!\n"
                       + "".join(f" [<6002d37a>] trace line {i}\n" for i in range(60)))
    why = kernel._why(str(console))
    assert "ptrace set fp regs failed" in why and "uml_xstate.c" in why
    assert "fp regs" not in kernel._tail(str(console))
    console.write_text("booting\nreboot: System halted\n")
    assert kernel._why(str(console)) == ""
