"""A kernel that can carry real IPsec, with the lab agent running in it.

If the running kernel can install an ESP SA (probed in a fresh network namespace), the agent
runs directly on it, in a mount namespace of its own. Otherwise user-mode-linux boots a
kernel that has ESP, with the host's filesystem as its read-only root, and the agent is the
guest's init.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import ipsecchan
from ipsecchan.lab import rpc
from ipsecchan.lab.errors import LabUnavailable

UML_DEFAULT = "linux.uml"
UML_MEMORY = "768M"
BOOT_TIMEOUT = 60.0

# A throw-away SA for the probe (documentation addresses, a fixed test key).
_PROBE = ["ip", "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2", "proto", "esp",
          "spi", "0x100", "mode", "transport", "aead", "rfc4106(gcm(aes))",
          "0x" + "11" * 20, "128"]


@dataclass(frozen=True)
class EspProbe:
    available: bool
    reason: str


def probe_esp() -> EspProbe:
    """Can this kernel install an ESP SA? Tried in a fresh network namespace, so the probe
    SA never touches the host's SAD."""
    if os.geteuid() != 0:
        return EspProbe(False, "the probe needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    try:
        r = subprocess.run(["unshare", "--net", *_PROBE], capture_output=True, text=True,
                           timeout=30)
    except FileNotFoundError as exc:
        return EspProbe(False, f"cannot run the probe: {exc}")
    if r.returncode == 0:
        return EspProbe(True, f"kernel {os.uname().release} installs ESP SAs")
    why = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
    return EspProbe(False, f"kernel {os.uname().release} cannot install an ESP SA ({why})")


class Kernel:
    """A running lab kernel. Use Kernel.start(); close() (or `with`) tears it down."""

    def __init__(self, kind: str, proc: subprocess.Popen, client: rpc.Client, workdir: str,
                 console: str | None):
        self.kind = kind             # "uml" or "direct"
        self._proc = proc
        self.agent = client
        self._workdir = workdir
        self._console = console
        info = client.wait_ready(BOOT_TIMEOUT)
        self.release = info["release"]
        self.state_dir = info["state_dir"]
        self.python = info["python"]

    # -- start ------------------------------------------------------------------------------
    @classmethod
    def start(cls, mode: str = "auto", uml: str | None = None) -> "Kernel":
        """mode: "auto" (probe, then direct or UML), "direct" or "uml"."""
        if mode not in ("auto", "direct", "uml"):
            raise ValueError(f"unknown kernel mode {mode!r}: auto, direct or uml")
        if mode == "auto":
            probe = probe_esp()
            if probe.available:
                return cls._start_direct()
            try:
                return cls._start_uml(uml)
            except LabUnavailable as exc:
                raise LabUnavailable(f"{probe.reason}, and {exc}") from None
        return cls._start_direct() if mode == "direct" else cls._start_uml(uml)

    @classmethod
    def _start_direct(cls) -> "Kernel":
        workdir = tempfile.mkdtemp(prefix="ipsecchan-lab-")
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
             "ipsecchan.lab.agent", "--state-dir", workdir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(),
            start_new_session=True)
        client = rpc.Client(proc.stdout, proc.stdin)
        return cls._finish_start("direct", proc, client, workdir, None)

    @classmethod
    def _start_uml(cls, uml: str | None) -> "Kernel":
        binary = shutil.which(uml or UML_DEFAULT)
        if binary is None:
            raise LabUnavailable(
                f"user-mode-linux is not installed ({uml or UML_DEFAULT} not found); "
                "install it with: apt-get install user-mode-linux kmod")
        if os.geteuid() != 0:
            raise LabUnavailable("the lab needs root: network namespaces and XFRM need "
                                 "CAP_SYS_ADMIN and CAP_NET_ADMIN inside the guest")
        pkg_root = _package_root()
        for path in (sys.executable, pkg_root):
            if any(c.isspace() for c in path):
                raise LabUnavailable(f"{path!r} has white space; the guest's kernel command "
                                     "line cannot carry it")
        workdir = tempfile.mkdtemp(prefix="ipsecchan-uml-")
        console = os.path.join(workdir, "console.log")
        env = None
        if _host_xsave_exceeds_uml():
            try:
                env = dict(os.environ, LD_PRELOAD=_build_xstate_shim(workdir))
            except LabUnavailable:
                shutil.rmtree(workdir, ignore_errors=True)
                raise
        ours, theirs = socket.socketpair()
        argv = [binary, f"mem={UML_MEMORY}", f"uml_dir={workdir}", "umid=lab",
                "rootfstype=hostfs", "rootflags=/", "ro", "con=null", "con0=null,fd:1",
                f"con1=fd:{theirs.fileno()}", "quiet", f"init={sys.executable}",
                # Unknown key=value words become the init's environment.
                "PYTHONDONTWRITEBYTECODE=1", f"PYTHONPATH={pkg_root}",
                "--", "-m", "ipsecchan.lab.guest"]
        try:
            with open(console, "wb") as out:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, pass_fds=(theirs.fileno(),),
                                        start_new_session=True, env=env)
        except OSError as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise LabUnavailable(f"cannot start {binary}: {exc}") from None
        finally:
            theirs.close()
        reader = ours.makefile("rb", buffering=0)
        writer = ours.makefile("wb", buffering=0)

        def on_close() -> str:
            return "the lab kernel (user-mode-linux) stopped" + _why(console) + \
                "; its console said:\n" + _tail(console)
        client = rpc.Client(reader, writer, on_close)
        kernel = cls._finish_start("uml", proc, client, workdir, console)
        kernel._sock = ours
        return kernel

    @classmethod
    def _finish_start(cls, kind, proc, client, workdir, console) -> "Kernel":
        try:
            return cls(kind, proc, client, workdir, console)
        except (rpc.ChannelClosed, rpc.RemoteError, TimeoutError) as exc:
            _stop(proc)
            detail = str(exc)
            if console and "console said" not in detail:
                detail += "\nconsole:\n" + _tail(console)
            shutil.rmtree(workdir, ignore_errors=True)
            raise LabUnavailable(f"the lab kernel ({kind}) did not start: {detail}") from None

    # -- use --------------------------------------------------------------------------------
    def call(self, op: str, /, *, rpc_timeout: float | None = 120, **args):
        return self.agent.call(op, rpc_timeout=rpc_timeout, **args)

    def console(self) -> str:
        return _tail(self._console, 200) if self._console else ""

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and self.agent.closed is None

    # -- stop -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._proc.poll() is None and self.agent.closed is None:
            try:
                self.agent.call("shutdown", rpc_timeout=10)
            except (rpc.ChannelClosed, TimeoutError, rpc.RemoteError):
                pass
        _stop(self._proc)
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# CPU features whose registers lie beyond the 832-byte XSAVE area (x87, SSE, AVX) that
# Debian 12's user-mode-linux (6.1) saves per guest thread: with any of them it cannot set a
# guest thread's registers, and its init dies at once. uml_xstate.c makes up the difference.
_XSAVE_BEYOND_AVX = {"avx512f", "ospke", "amx_tile"}


def _host_xsave_exceeds_uml() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(_XSAVE_BEYOND_AVX & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def _build_xstate_shim(workdir: str) -> str:
    """Compile uml_xstate.c into the boot's private folder (never a shared, predictable path:
    this library is preloaded into a process running as root)."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uml_xstate.c")
    target = os.path.join(workdir, "uml_xstate.so")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise LabUnavailable("this CPU's vector registers (AVX-512, PKRU or AMX) need a shim "
                             "for user-mode-linux, built with a C compiler: apt-get install gcc")
    r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", target, source, "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabUnavailable(f"cannot build the user-mode-linux register shim: {r.stderr.strip()}")
    return target


def _package_root() -> str:
    """The folder holding the ipsecchan package, for the agent's import path."""
    return os.path.dirname(os.path.dirname(os.path.abspath(ipsecchan.__file__)))


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    return env


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Wait for the kernel process to end; kill its whole process group if it does not."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    # UML's helper processes live in this group; a traced one takes a moment to die.
    deadline = time.monotonic() + 5
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        while time.monotonic() < deadline:
            time.sleep(0.02)
            os.killpg(proc.pid, 0)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


# Console lines that say why a guest died, often above the last lines (a panic's trace).
_FATAL = ("ptrace set fp regs failed", "Kernel panic")


def _why(path: str | None) -> str:
    try:
        with open(path or "", "rb") as f:
            found = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines()
                     if any(m in line for m in _FATAL)]
    except OSError:
        return ""
    why = ": " + " / ".join(found[:3]) if found else ""
    if any("fp regs" in line for line in found):
        why += (" (this CPU's XSAVE area is larger than this user-mode-linux kernel knows;"
                " the lab's register shim, ipsecchan/lab/uml_xstate.c, did not cover it)")
    return why


def _tail(path: str | None, lines: int = 40) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no console output)"
    return "\n".join(text.splitlines()[-lines:])
