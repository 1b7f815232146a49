"""The lab's wire: JSON lines between the controller and the agent inside the lab kernel.

One request or response per line. Lines carry only printable ASCII (bytes travel as base64
under the key "$b"), so the channel may be a raw tty (user-mode-linux's console line) as well
as a pipe. Requests carry an id; the agent answers each in its own thread, so several calls
(a background server and a client, say) can be under way at once.
"""
from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import Future
from typing import Any, BinaryIO, Callable


# The longest request line the agent is sure to receive whole. The guest's console is a tty
# whose input buffer holds 4096 bytes; the controller writes faster than the guest reads, and
# the bytes of a longer line that do not fit are dropped (with its newline: the request is
# never answered). Bigger inputs go through a file (the guest sees the host's filesystem).
MAX_REQUEST_LINE = 4000


class RemoteError(Exception):
    """An operation failed inside the lab kernel; `kind` is the remote exception's class."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}" if kind not in message else message)
        self.kind = kind
        self.remote_message = message


class ChannelClosed(ConnectionError):
    """The lab kernel's agent is gone (the guest died, or was shut down)."""


def _default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(obj)).decode("ascii")}
    raise TypeError(f"cannot send {type(obj).__name__} to the lab agent")


def _hook(obj: dict) -> Any:
    if len(obj) == 1 and "$b" in obj:
        return base64.b64decode(obj["$b"])
    return obj


def encode(message: dict) -> bytes:
    return json.dumps(message, default=_default, ensure_ascii=True,
                      separators=(",", ":")).encode("ascii") + b"\n"


def decode(line: bytes) -> dict:
    return json.loads(line, object_hook=_hook)


class Client:
    """Controller side: call(op, **args) -> result, from any thread."""

    def __init__(self, reader: BinaryIO, writer: BinaryIO, on_close: Callable[[], str] | None = None):
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next_id = 1
        self._closed: str | None = None
        self._on_close = on_close
        self._ready = threading.Event()   # the agent says hello once its end is set up
        self._thread = threading.Thread(target=self._read_loop, name="lab-rpc", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        why = "the lab agent closed its channel"
        try:
            for line in self._reader:
                line = line.strip()
                if not line.startswith(b"{"):
                    continue            # console noise before the agent took the line over
                msg = decode(line)
                if "hello" in msg:
                    self.hello = msg["hello"]
                    self._ready.set()
                    continue
                if "ok" not in msg:
                    continue            # not an answer (e.g. a tty echoing a request)
                fut = self._pending.pop(msg.get("id"), None)
                if fut is None:
                    continue
                if msg.get("ok"):
                    fut.set_result(msg.get("result"))
                else:
                    err = msg.get("error") or {}
                    fut.set_exception(RemoteError(err.get("kind", "Error"), err.get("message", "")))
        except (OSError, ValueError) as exc:
            why = f"the lab agent's channel failed: {exc}"
        finally:
            if self._on_close is not None:
                why = self._on_close() or why
            with self._lock:
                self._closed = why
                pending, self._pending = self._pending, {}
            for fut in pending.values():
                fut.set_exception(ChannelClosed(why))
            self._ready.set()

    def wait_ready(self, timeout: float) -> Any:
        """Wait for the agent's hello; returns what it said about itself."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the lab agent did not come up within {timeout} s")
        if self._closed is not None:
            raise ChannelClosed(self._closed)
        return self.hello

    def call(self, op: str, /, *, rpc_timeout: float | None = 120, **args: Any) -> Any:
        """Run `op` in the agent with keyword `args`; wait at most rpc_timeout seconds."""
        fut: Future = Future()
        with self._lock:
            if self._closed is not None:
                raise ChannelClosed(self._closed)
            line = encode({"id": self._next_id, "op": op, "args": args})
            if len(line) > MAX_REQUEST_LINE:
                raise ValueError(f"lab request {op!r} is {len(line)} bytes, more than the "
                                 f"lab console takes whole ({MAX_REQUEST_LINE}): pass large "
                                 f"inputs through a file")
            rid = self._next_id
            self._next_id += 1
            self._pending[rid] = fut
            try:
                self._writer.write(line)
                self._writer.flush()
            except OSError as exc:
                self._pending.pop(rid, None)
                raise ChannelClosed(f"cannot reach the lab agent: {exc}") from exc
        try:
            return fut.result(rpc_timeout)
        except TimeoutError:
            self._pending.pop(rid, None)
            raise TimeoutError(f"lab agent did not answer {op!r} within {rpc_timeout} s") from None

    @property
    def closed(self) -> str | None:
        return self._closed


def serve(reader: BinaryIO, writer: BinaryIO, handlers: dict[str, Callable[..., Any]]) -> None:
    """Agent side: say hello, then answer requests until the channel closes or a
    "shutdown" request."""
    wlock = threading.Lock()
    writer.write(encode({"hello": handlers["ping"]()}))
    writer.flush()

    def answer(rid: Any, op: str, args: dict) -> None:
        try:
            handler = handlers.get(op)
            if handler is None:
                raise LookupError(f"unknown lab operation {op!r}")
            reply = {"id": rid, "ok": True, "result": handler(**args)}
        except Exception as exc:  # every failure goes back to the caller, none kills the agent
            reply = {"id": rid, "ok": False,
                     "error": {"kind": type(exc).__name__, "message": str(exc)}}
        with wlock:
            writer.write(encode(reply))
            writer.flush()

    for line in reader:
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            msg = decode(line)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            # A damaged line (bytes lost on the console): its caller times out, and the
            # agent serves on (it must not die with one bad line).
            continue
        rid, op, args = msg.get("id"), msg.get("op"), msg.get("args") or {}
        if op == "shutdown":
            answer(rid, op, args)
            return
        threading.Thread(target=answer, args=(rid, op, args), daemon=True).start()
