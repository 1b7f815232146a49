"""The lab agent: runs inside the kernel that has real IPsec and carries out the controller's
requests (commands, background processes, files, VICI calls).

It is deliberately thin — the lab's logic (topology, identities, IKE) lives in the controller
(ipsecchan.lab.lab) — and it confines every file it writes to its own state folder, which is
a tmpfs: under user-mode-linux the root filesystem is the host's, so nothing else may be
written.
"""
from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from ipsecchan.lab import rpc

STATE_DIR_UML = "/run/ipsecchan-lab"


class Agent:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.procs: dict[int, subprocess.Popen] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin",
                        PYTHONDONTWRITEBYTECODE="1", TMPDIR=os.path.join(state_dir, "tmp"))
        os.makedirs(self.env["TMPDIR"], exist_ok=True)
        os.makedirs(os.path.join(state_dir, "procs"), exist_ok=True)

    # -- paths ------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        """A path inside the state folder; anything that would leave it is refused."""
        full = os.path.realpath(os.path.join(self.state_dir, rel))
        if full != self.state_dir and not full.startswith(self.state_dir + os.sep):
            raise PermissionError(f"{rel!r} is outside the lab's state folder")
        return full

    def _argv(self, argv: list[str], netns: str | None) -> list[str]:
        if not argv:
            raise ValueError("empty command")
        return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)

    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        return {**self.env, **(env or {})}

    # -- operations -------------------------------------------------------------------------
    def op_ping(self) -> dict:
        return {"release": os.uname().release, "state_dir": self.state_dir, "pid": os.getpid(),
                "python": sys.executable}

    def op_run(self, argv: list[str], netns: str | None = None, input: bytes | None = None,
               timeout: float = 60, env: dict[str, str] | None = None) -> dict:
        try:
            r = subprocess.run(self._argv(argv, netns), input=input or b"", capture_output=True,
                               timeout=timeout, env=self._env(env), start_new_session=True)
        except FileNotFoundError as exc:
            return {"rc": 127, "stdout": b"", "stderr": str(exc).encode()}
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{argv[0]} did not finish within {timeout} s; "
                               f"output so far: {exc.stdout!r} {exc.stderr!r}") from None
        return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}

    def op_spawn(self, argv: list[str], netns: str | None = None,
                 env: dict[str, str] | None = None) -> int:
        handle = next(self._ids)
        out = open(self.path(f"procs/{handle}.out"), "wb")
        err = open(self.path(f"procs/{handle}.err"), "wb")
        with out, err:
            proc = subprocess.Popen(self._argv(argv, netns), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, env=self._env(env), start_new_session=True)
        with self._lock:
            self.procs[handle] = proc
        return handle

    def _proc(self, handle: int) -> subprocess.Popen:
        try:
            return self.procs[handle]
        except KeyError:
            raise LookupError(f"no process {handle} in the lab") from None

    def op_output(self, handle: int) -> dict:
        proc = self._proc(handle)
        with open(self.path(f"procs/{handle}.out"), "rb") as o, \
                open(self.path(f"procs/{handle}.err"), "rb") as e:
            return {"rc": proc.poll(), "pid": proc.pid, "stdout": o.read(), "stderr": e.read()}

    def op_wait(self, handle: int, timeout: float = 60) -> dict:
        try:
            self._proc(handle).wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"process {handle} still running after {timeout} s") from None
        return self.op_output(handle)

    def op_signal(self, handle: int, sig: int = signal.SIGTERM) -> None:
        proc = self._proc(handle)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def op_forget(self, handle: int) -> None:
        """Drop a finished process and its output files."""
        with self._lock:
            proc = self.procs.get(handle)
            if proc is not None and proc.poll() is None:
                raise RuntimeError(f"process {handle} is still running")
            self.procs.pop(handle, None)
        for ext in ("out", "err"):
            try:
                os.unlink(self.path(f"procs/{handle}.{ext}"))
            except FileNotFoundError:
                pass

    def op_write_file(self, path: str, data: bytes, mode: int = 0o644) -> str:
        full = self.path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(full, mode)
        return full

    def op_read_file(self, path: str) -> bytes:
        with open(self.path(path), "rb") as f:
            return f.read()

    def op_remove(self, path: str) -> None:
        full = self.path(path)
        if full == self.state_dir:
            raise PermissionError("refusing to remove the state folder itself")
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)

    def op_wait_socket(self, path: str, timeout: float = 10, handle: int | None = None) -> bool:
        """Wait until a Unix socket at `path` accepts connections (or process `handle` exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if handle is not None and self._proc(handle).poll() is not None:
                return False
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return True
                except OSError:
                    pass
            time.sleep(0.02)
        return False

    def op_vici(self, socket_path: str, command: str, args: dict | None = None,
                timeout: float = 30) -> Any:
        """One VICI command; streamed commands (list-sas, initiate, ...) return all items."""
        import vici   # imported here: only hosts that run charon pay for it

        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(socket_path)
            session = vici.Session(s)
            method = getattr(session, command.replace("-", "_"), None)
            if method is None or command.startswith("_"):
                raise LookupError(f"unknown VICI command {command!r}")
            try:
                result = method(args) if args is not None else method()
                if result is not None and not isinstance(result, dict):
                    result = list(result)
            except vici.exception.CommandException as exc:
                raise RuntimeError(f"VICI {command} failed: {_plain(exc.args)}") from None
        return _plain(result)

    def op_shutdown(self) -> None:
        for handle in list(self.procs):
            self.op_signal(handle, signal.SIGKILL)

    def handlers(self) -> dict:
        return {name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}


def _plain(obj: Any) -> Any:
    """VICI answers in bytes; text becomes str, binary (DER, keys) stays bytes."""
    if isinstance(obj, bytes):
        try:
            text = obj.decode("utf-8")
        except UnicodeDecodeError:
            return obj
        return text if text.isprintable() else obj
    if isinstance(obj, dict):
        return {(k.decode() if isinstance(k, bytes) else k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    return obj


def _mount_tmpfs(target: str, name: str) -> None:
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", name, target], check=True)


def main(argv: list[str] | None = None) -> int:
    """Direct mode: the controller started us with `unshare --mount` on a kernel with ESP.

    We hide the host's namespaces and keep our files in tmpfs, all inside our own mount
    namespace, then serve on stdin/stdout.
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ipsecchan.lab.agent")
    ap.add_argument("--state-dir", required=True)
    opts = ap.parse_args(argv)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    _mount_tmpfs(opts.state_dir, "ipsecchan-lab")
    _mount_tmpfs("/run/netns", "ipsecchan-netns")
    agent = Agent(opts.state_dir)
    try:
        rpc.serve(sys.stdin.buffer, sys.stdout.buffer, agent.handlers())
    finally:
        agent.op_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
