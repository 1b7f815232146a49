"""strongSwan (charon) over VICI: which IKE identities stand behind a kernel SA.

Sources, as strongSwan 5.9.8 gives them (checked in the lab; tests/data/vici/ holds
recorded answers):

* `list-sas`: per IKE_SA (section named after its connection, i.e. the peer_cfg) its
  `uniqueid`, `local-host`/`remote-host`, `local-id`/`remote-id`; per CHILD_SA its `name`,
  `uniqueid`, `reqid`, `state`, `mode`, `protocol`, `spi-in`/`spi-out` (hex). It says nothing
  about how the IDs were authenticated, nor which certificate or key was used.
* `list-conns {ike: <IKE_SA name>}`: the connection the IKE_SA was made from. Its single
  auth round `local-1` / `remote-1` gives `class` ("public key", "pre-shared key", ...) and
  `certs`: the subjects of the certificates or raw public keys the configuration pins for
  that end (swanctl `certs=` / `pubkeys=`; charon's AUTH_RULE_SUBJECT_CERT). With a pinned
  credential, charon accepts the peer only if it authenticated with exactly that credential
  ("constraint check failed: peer not authenticated with peer cert" otherwise).
* `list-certs {subject: <pinned subject>}`: the credentials charon holds for that subject:
  X.509 (`type` X509, `data` = DER certificate) or raw keys (`type` PUBKEY, `data` = DER
  SubjectPublicKeyInfo, `subject`).

The public key is reported only when all of these hold: the end has exactly one auth round,
of class "public key", pinning exactly one credential, and every credential charon holds for
that subject carries the same public key. Otherwise (a CA-trusted peer with no pinned
certificate, several candidates, a connection since unloaded) `pubkey_sha256` is None: never
a guess. The auth data is read when the IKE_SA is first seen and kept for that IKE_SA (an
IKEv2 IKE_SA rekey does not re-authenticate, so the new IKE_SA inherits it). Remaining
weakness: a connection reloaded with another pinned credential *between* the IKE_SA's
authentication and that first read would be misreported; VICI gives no way to see the
credential an IKE_SA actually used.
"""
from __future__ import annotations

import hashlib
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ipsecchan.ike.base import (AUTH_PSK, AUTH_PUBKEY, AUTH_UNKNOWN, EV_DAEMON_BACK,
                                EV_DAEMON_LOST, EV_DOWN, EV_REKEY, EV_UP, Event, Identity,
                                SAIdentity, SourceUnavailable, State, norm_addr, norm_proto,
                                unavailable, unknown)

DEFAULT_SOCKET = "/var/run/charon.vici"
EVENTS = ("ike-updown", "child-updown", "ike-rekey", "child-rekey")
SOURCE = "strongswan"
AUTH_CLASSES = {"public key": AUTH_PUBKEY, "pre-shared key": AUTH_PSK}
# CHILD_SA states in which the kernel holds its SAs (list_child in vici_query.c).
LIVE_CHILD_STATES = ("INSTALLED", "REKEYING", "REKEYED", "UPDATING", "DELETING")


def text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _int(v: Any, base: int = 10) -> int | None:
    try:
        return int(text(v), base)
    except ValueError:
        return None


# -- parsing VICI answers (pure) ----------------------------------------------------------
@dataclass(frozen=True)
class IkeInfo:
    name: str
    uniqueid: int | None
    state: str
    local_host: str
    remote_host: str
    local_id: str
    remote_id: str


@dataclass(frozen=True)
class ChildInfo:
    name: str
    uniqueid: int | None
    reqid: int | None
    state: str
    mode: str
    proto: str
    spi_in: int | None
    spi_out: int | None


@dataclass(frozen=True)
class EndAuth:
    """What the configuration says of one end's authentication, and the key it pins."""
    auth: str
    pubkey_sha256: str | None = None
    cert_sha256: str | None = None


NO_AUTH = EndAuth(AUTH_UNKNOWN)


def parse_ike(name: Any, d: dict) -> IkeInfo:
    return IkeInfo(text(name), _int(d.get("uniqueid")), text(d.get("state")),
                   norm_addr(text(d.get("local-host"))), norm_addr(text(d.get("remote-host"))),
                   text(d.get("local-id")), text(d.get("remote-id")))


def parse_child(d: dict) -> ChildInfo:
    return ChildInfo(text(d.get("name")), _int(d.get("uniqueid")), _int(d.get("reqid")),
                     text(d.get("state")), text(d.get("mode")).lower(),
                     norm_proto(text(d.get("protocol"))),
                     _int(d.get("spi-in"), 16) if d.get("spi-in") is not None else None,
                     _int(d.get("spi-out"), 16) if d.get("spi-out") is not None else None)


def parse_list_sas(items) -> list[tuple[IkeInfo, list[ChildInfo]]]:
    """list-sas answers (one dict per IKE_SA: {name: {...}}) as IKE_SAs with their children."""
    out = []
    for item in items:
        for name, d in item.items():
            ike = parse_ike(name, d)
            children = [parse_child(c) for c in (d.get("child-sas") or {}).values()]
            out.append((ike, children))
    return out


def conn_end(conn: dict, local: bool) -> tuple[str, list[str]]:
    """(auth kind, pinned credential subjects) of one end of a list-conns connection. Only a
    single auth round is understood; more rounds (e.g. pubkey + EAP) give "unknown"."""
    prefix = "local-" if local else "remote-"
    rounds = [v for k, v in conn.items() if text(k).startswith(prefix) and isinstance(v, dict)]
    if len(rounds) != 1:
        return AUTH_UNKNOWN, []
    r = rounds[0]
    kind = AUTH_CLASSES.get(text(r.get("class")), AUTH_UNKNOWN)
    return kind, [text(s) for s in (r.get("certs") or [])]


def spki_of(cred: dict) -> tuple[bytes | None, bytes | None]:
    """(DER SubjectPublicKeyInfo, DER certificate or None) of one list-certs entry."""
    kind, data = text(cred.get("type")), cred.get("data")
    if not isinstance(data, (bytes, bytearray)):
        return None, None
    data = bytes(data)
    if kind == "PUBKEY":
        return data, None
    if kind == "X509":
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            return None, None
        return cert.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo), data
    return None, None


def resolve_key(kind: str, pinned: list[str],
                creds_for: Callable[[str], list[dict]]) -> EndAuth:
    """The end's auth, with its public key when it is certain (see the module doc)."""
    if kind != AUTH_PUBKEY or len(pinned) != 1:
        return EndAuth(kind)
    spkis, certs, others = set(), set(), 0
    for cred in creds_for(pinned[0]):
        spki, cert = spki_of(cred)
        if spki is None:
            continue
        spkis.add(spki)
        if cert is None:
            others += 1
        else:
            certs.add(cert)
    if len(spkis) != 1:
        return EndAuth(kind)
    cert_sha = hashlib.sha256(next(iter(certs))).hexdigest() if (
        len(certs) == 1 and not others) else None
    return EndAuth(kind, hashlib.sha256(next(iter(spkis))).hexdigest(), cert_sha)


def resolve_conn(conn: dict | None,
                 creds_for: Callable[[str], list[dict]]) -> tuple[EndAuth, EndAuth]:
    """(local, remote) EndAuth of a list-conns connection (None: no such connection)."""
    if conn is None:
        return NO_AUTH, NO_AUTH
    return (resolve_key(*conn_end(conn, True), creds_for),
            resolve_key(*conn_end(conn, False), creds_for))


def child_answer(ike: IkeInfo, child: ChildInfo, auth: tuple[EndAuth, EndAuth]) -> SAIdentity:
    loc, rem = auth
    return SAIdentity(
        State.VERIFIED, SOURCE,
        local=Identity(ike.local_id, loc.auth, loc.pubkey_sha256, loc.cert_sha256),
        peer=Identity(ike.remote_id, rem.auth, rem.pubkey_sha256, rem.cert_sha256),
        ike_name=ike.name, ike_id=ike.uniqueid, child_name=child.name,
        child_id=child.uniqueid, reqid=child.reqid, spi_in=child.spi_in,
        spi_out=child.spi_out, proto=child.proto, mode=child.mode,
        local_addr=ike.local_host, remote_addr=ike.remote_host)


def sa_keys(ans: SAIdentity) -> list[tuple[str, str, int]]:
    """The kernel SAD keys (proto, dst, spi) of a CHILD_SA answer: inbound and outbound."""
    keys = []
    if ans.spi_in is not None:
        keys.append((ans.proto, ans.local_addr, ans.spi_in))
    if ans.spi_out is not None:
        keys.append((ans.proto, ans.remote_addr, ans.spi_out))
    return keys


def match_sa(ans: SAIdentity, sa) -> bool:
    """Does kernel SA `sa` belong to the CHILD_SA answer (SPI, proto, both addresses,
    and the reqid when the kernel SA has one)?"""
    proto, spi = norm_proto(sa.proto), int(sa.spi)
    src, dst = norm_addr(sa.src), norm_addr(sa.dst)
    if proto != ans.proto:
        return False
    inbound = spi == ans.spi_in and dst == ans.local_addr and src == ans.remote_addr
    outbound = spi == ans.spi_out and dst == ans.remote_addr and src == ans.local_addr
    if not (inbound or outbound):
        return False
    reqid = getattr(sa, "reqid", 0) or 0
    return not reqid or ans.reqid is None or reqid == ans.reqid


def parse_event(name: str, data: dict,
                auth_for: Callable[[IkeInfo], tuple[EndAuth, EndAuth]]) -> list[Event]:
    """Typed events from one VICI event message."""
    out = []
    # "up" = "yes" sits at the message's top level, beside the IKE_SA section; a down
    # event has no "up" at all.
    up = text(data.get("up") or data.get(b"up")) == "yes"
    for ike_name, d in data.items():
        if not isinstance(d, dict):
            continue
        if name == "ike-rekey":
            old = parse_ike(ike_name, d.get("old") or {})
            new = parse_ike(ike_name, d.get("new") or {})
            out.append(Event(EV_REKEY, SOURCE, "ike", old.name, old.uniqueid, new.uniqueid))
            continue
        ike = parse_ike(ike_name, d)
        if name == "ike-updown":
            out.append(Event(EV_UP if up else EV_DOWN, SOURCE, "ike", ike.name,
                             None if up else ike.uniqueid, ike.uniqueid if up else None))
            continue
        auth = auth_for(ike)
        for c in (d.get("child-sas") or {}).values():
            if name == "child-rekey":
                old = child_answer(ike, parse_child(c.get("old") or {}), auth)
                new = child_answer(ike, parse_child(c.get("new") or {}), auth)
                out.append(Event(EV_REKEY, SOURCE, "child", ike.name, ike.uniqueid,
                                 ike.uniqueid, old, new))
            elif name == "child-updown":
                ans = child_answer(ike, parse_child(c), auth)
                out.append(Event(EV_UP if up else EV_DOWN, SOURCE, "child", ike.name,
                                 ike.uniqueid, ike.uniqueid, None if up else ans,
                                 ans if up else None))
    return out


# -- the adapter ---------------------------------------------------------------------------
class StrongSwanSource:
    """Identities from charon over VICI.

    follow=True runs a thread with a VICI session of its own that listens for ike/child
    up/down/rekey events, reconnects after charon restarts (reporting daemon-lost and
    daemon-back) and keeps the list-sas cache valid. While that session is down, identify()
    answers UNAVAILABLE. With follow=False every identify() asks charon.
    """

    name = SOURCE

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout: float = 5.0,
                 follow: bool = True, retry: float = 0.5):
        self.socket_path, self.timeout, self.retry = socket_path, timeout, retry
        self._lock = threading.RLock()
        self._events: queue.Queue[Event] = queue.Queue()
        self._cache: dict[tuple[str, str, int], SAIdentity] | None = None
        self._gen = 0                       # bumped by every event: invalidates the cache
        self._auth: dict[tuple[str, int | None], tuple[EndAuth, EndAuth]] = {}
        self._connected = False             # the event session is registered
        self._session_epoch = 0             # bumped whenever the event session comes or goes
        self._stop = threading.Event()
        self._listen_sock: socket.socket | None = None
        self._thread = None
        self.follow = follow
        if follow:
            self._thread = threading.Thread(target=self._run, name="vici-events", daemon=True)
            self._thread.start()

    @property
    def epoch(self) -> int | None:
        """IdentitySource.epoch: one per event session. Without one (follow=False) the loss
        of charon is seen only by asking: no epoch."""
        return self._session_epoch if self.follow else None

    # -- VICI -------------------------------------------------------------------------------
    def _session(self):
        import vici
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(self.timeout)
        try:
            s.connect(self.socket_path)
        except OSError:
            s.close()
            raise
        return vici.Session(s), s

    def _ask(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(session) on a fresh session; every failure becomes SourceUnavailable."""
        import vici
        try:
            sess, s = self._session()
        except OSError as exc:
            raise SourceUnavailable(f"cannot connect to {self.socket_path}: {exc}") from None
        try:
            return fn(sess)
        except (OSError, vici.exception.SessionException,
                vici.exception.CommandException,
                vici.exception.DeserializationException) as exc:
            raise SourceUnavailable(f"VICI on {self.socket_path}: {exc!r}") from None
        finally:
            s.close()

    def _creds_for(self, sess) -> Callable[[str], list[dict]]:
        return lambda subject: list(sess.list_certs({"subject": subject}))

    def _auth_for_ike(self, ike: IkeInfo, sess=None) -> tuple[EndAuth, EndAuth]:
        key = (ike.name, ike.uniqueid)
        with self._lock:
            if key in self._auth:
                return self._auth[key]

        def fetch(s):
            conns = [c for item in s.list_conns({"ike": ike.name})
                     for n, c in item.items() if text(n) == ike.name]
            return resolve_conn(conns[0] if len(conns) == 1 else None, self._creds_for(s))
        auth = fetch(sess) if sess is not None else self._ask(fetch)
        with self._lock:
            self._auth[key] = auth
        return auth

    def _auth_or_none(self, ike: IkeInfo) -> tuple[EndAuth, EndAuth]:
        try:
            return self._auth_for_ike(ike)
        except SourceUnavailable:
            return NO_AUTH, NO_AUTH

    def _query(self) -> list[SAIdentity]:
        if not self.follow:
            # Nothing tells us of restarts (unique ids start again at 1): read afresh.
            with self._lock:
                self._auth.clear()

        def run(sess):
            answers = []
            for ike, children in parse_list_sas(sess.list_sas()):
                live = [c for c in children if c.state in LIVE_CHILD_STATES]
                if not live:
                    continue
                auth = self._auth_for_ike(ike, sess)
                answers += [child_answer(ike, c, auth) for c in live]
            return answers
        return self._ask(run)

    # -- IdentitySource ----------------------------------------------------------------------
    def snapshot(self) -> list[SAIdentity]:
        if self.follow and not self._connected:
            raise SourceUnavailable(f"charon at {self.socket_path} is not connected")
        return self._query()

    def _refresh(self) -> dict:
        with self._lock:
            gen = self._gen
        answers = self._query()
        table = {}
        for ans in answers:
            for k in sa_keys(ans):
                table[k] = ans
        with self._lock:
            if self.follow and self._connected and gen == self._gen:
                self._cache = table
        return table

    def identify(self, sa) -> SAIdentity:
        if self.follow and not self._connected:
            return unavailable(SOURCE, f"no VICI session with charon at {self.socket_path}")
        key = (norm_proto(sa.proto), norm_addr(sa.dst), int(sa.spi))
        with self._lock:
            cache = self._cache if self.follow and self._connected else None
        hit = cache.get(key) if cache is not None else None
        if hit is not None and match_sa(hit, sa):
            return hit
        try:                                       # a miss asks the daemon
            table = self._refresh()
        except SourceUnavailable as exc:
            return unavailable(SOURCE, str(exc))
        ans = table.get(key)
        if ans is not None and match_sa(ans, sa):
            return ans
        return unknown(SOURCE, "charon owns no CHILD_SA with this SA "
                               f"({key[0]} spi {key[2]:#010x} dst {key[1]})")

    def next_event(self, timeout: float | None = None) -> Event | None:
        if timeout == 0 and not self.has_events():
            return None
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def has_events(self) -> bool:
        """Whether events are queued (without the queue's lock: in CPython each acquisition
        of a lock reads the clock, a system call under user-mode-linux)."""
        return bool(self._events.queue)

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until the event session is registered (identify() answers UNAVAILABLE until
        then); False if it is not within `timeout` seconds."""
        end = time.monotonic() + timeout
        while not self._connected and time.monotonic() < end:
            time.sleep(0.05)
        return self._connected

    def close(self) -> None:
        self._stop.set()
        s = self._listen_sock
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the event thread ---------------------------------------------------------------------
    def _set_connected(self, up: bool, reason: str = "") -> None:
        with self._lock:
            was = self._connected
            self._connected = up
            self._session_epoch += 1
            self._gen += 1
            self._cache = None
            if not up:
                self._auth.clear()
        if up and not was:
            self._events.put(Event(EV_DAEMON_BACK, SOURCE, reason=reason))
        elif not up and (was or reason.startswith("initial")):
            self._events.put(Event(EV_DAEMON_LOST, SOURCE, reason=reason))

    def _handle(self, name: str, data: dict) -> None:
        with self._lock:
            self._gen += 1
            self._cache = None
        if name == "ike-rekey":          # the new IKE_SA inherits the old one's authentication
            for ike_name, d in data.items():
                if not isinstance(d, dict):
                    continue
                old = parse_ike(ike_name, d.get("old") or {})
                new = parse_ike(ike_name, d.get("new") or {})
                with self._lock:
                    if (old.name, old.uniqueid) in self._auth:
                        self._auth[(new.name, new.uniqueid)] = self._auth[(old.name,
                                                                           old.uniqueid)]
        for ev in parse_event(name, data, self._auth_or_none):
            if ev.level == "ike" and ev.kind == EV_DOWN:
                with self._lock:
                    self._auth.pop((ev.ike_name, ev.old_ike_id), None)
            self._events.put(ev)

    def _run(self) -> None:
        import vici
        first = True
        while not self._stop.is_set():
            try:
                sess, s = self._session()
            except OSError as exc:
                if first or self._connected:
                    self._set_connected(False, ("initial: " if first else "") +
                                        f"cannot connect to {self.socket_path}: {exc}")
                first = False
                self._stop.wait(self.retry)
                continue
            first = False
            self._listen_sock = s
            stream = sess.listen(list(EVENTS), timeout=self.retry)
            try:
                for label, data in stream:
                    if self._stop.is_set():
                        break
                    if not self._connected:     # registered for every event: now valid
                        self._set_connected(True, f"connected to {self.socket_path}")
                    if label is not None:
                        self._handle(text(label), data)
            except (OSError, vici.exception.SessionException,
                    vici.exception.DeserializationException,
                    vici.exception.EventUnknownException) as exc:
                if not self._stop.is_set():
                    self._set_connected(False, f"VICI event session lost: {exc!r}")
            finally:
                try:
                    stream.close()          # unregisters; fails harmlessly on a dead socket
                except Exception:
                    pass
                self._listen_sock = None
                s.close()
            if not self._stop.is_set():
                time.sleep(min(self.retry, 0.2))
