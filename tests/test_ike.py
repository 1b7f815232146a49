"""ipsecchan.ike on the host: parsing recorded strongSwan 5.9.8 VICI answers (tests/data/vici,
recorded in the lab), the static source, chain precedence, and failing closed."""
import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ipsecchan.ike import (ChainSource, Identity, SAIdentity, SourceUnavailable, State,
                           StaticConfigError, StaticSource, StrongSwanSource)
from ipsecchan.ike import strongswan as ss

DATA = os.path.join(os.path.dirname(__file__), "data", "vici")


def _decode(o):
    if isinstance(o, dict):
        if set(o) == {"$s"}:
            return o["$s"].encode()
        if set(o) == {"$b"}:
            return base64.b64decode(o["$b"])
        return {k: _decode(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_decode(x) for x in o]
    return o


def recorded(auth):
    with open(os.path.join(DATA, f"{auth}.json")) as f:
        d = json.load(f)
    return _decode(d["query"]), [(e["event"], _decode(e["data"])) for e in d["events"]]


@dataclass
class FakeSA:          # the fields of ipsecchan.xfrm.SA that identify() reads
    src: str
    dst: str
    proto: str
    spi: int
    reqid: int = 0
    mode: str = "transport"


class FakeSession:
    """Answers VICI queries from a recorded strongSwan answer set."""

    def __init__(self, query, calls):
        self.q, self.calls = query, calls

    def list_sas(self, filters=None):
        self.calls.append("list-sas")
        return iter(self.q["list-sas"])

    def list_conns(self, filters=None):
        self.calls.append("list-conns")
        name = (filters or {}).get("ike")
        return iter([c for c in self.q["list-conns"] if name is None or name in c])

    def list_certs(self, filters=None):
        self.calls.append("list-certs")
        return iter(self.q["list-certs-by-subject"].get((filters or {}).get("subject"), []))


def fake_source(monkeypatch, auth, calls=None):
    query, _ = recorded(auth)
    calls = [] if calls is None else calls

    class _Sock:
        def close(self):
            pass
    monkeypatch.setattr(StrongSwanSource, "_session",
                        lambda self: (FakeSession(query, calls), _Sock()))
    return StrongSwanSource("/nonexistent", follow=False), query, calls


def spki_sha(cert_der):
    key = x509.load_der_x509_certificate(cert_der).public_key()
    return hashlib.sha256(key.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                          ).hexdigest()


def the_child(query):
    [(ike, [child])] = ss.parse_list_sas(query["list-sas"])
    return ike, child


# -- parsing ------------------------------------------------------------------------------
def test_parse_list_sas_cert():
    query, _ = recorded("cert")
    ike, child = the_child(query)
    assert (ike.name, ike.uniqueid, ike.local_id, ike.remote_id) == (
        "alice-bob-v4", 1, "CN=alice", "CN=bob")
    assert (ike.local_host, ike.remote_host) == ("10.0.0.1", "10.0.0.2")
    assert (child.name, child.state, child.mode, child.proto) == (
        "transport", "INSTALLED", "transport", "esp")
    raw = query["list-sas"][0]["alice-bob-v4"]["child-sas"]
    [c] = raw.values()
    assert child.spi_in == int(c["spi-in"], 16) and child.spi_out == int(c["spi-out"], 16)
    assert child.reqid == int(c["reqid"])


@pytest.mark.parametrize("auth", ["cert", "rpk"])
def test_pubkey_from_pinned_credential(auth):
    query, _ = recorded(auth)
    [conn] = [c["alice-bob-v4"] for c in query["list-conns"]]
    creds = query["list-certs-by-subject"]
    local, remote = ss.resolve_conn(conn, lambda s: creds.get(s, []))
    assert local.auth == remote.auth == "pubkey"
    peer_subject = "CN=bob" if auth == "cert" else "bob.lab"
    [cred] = creds[peer_subject]
    if auth == "cert":
        # The certificate really is bob's, and the key is the one inside it.
        cert = x509.load_der_x509_certificate(cred["data"])
        assert cert.subject.rfc4514_string() == "CN=bob"
        assert remote.pubkey_sha256 == spki_sha(cred["data"])
        assert remote.cert_sha256 == hashlib.sha256(cred["data"]).hexdigest()
    else:
        assert cred["type"] == b"PUBKEY" and cred["subject"] == b"bob.lab"
        serialization.load_der_public_key(cred["data"])     # a real SPKI
        assert remote.pubkey_sha256 == hashlib.sha256(cred["data"]).hexdigest()
        assert remote.cert_sha256 is None
    assert local.pubkey_sha256 not in (None, remote.pubkey_sha256)


def test_psk_has_no_key():
    query, _ = recorded("psk")
    [conn] = [c["alice-bob-v4"] for c in query["list-conns"]]
    local, remote = ss.resolve_conn(conn, lambda s: pytest.fail("no credential lookup"))
    assert local == remote == ss.EndAuth("psk")


def test_key_not_reported_unless_certain():
    query, _ = recorded("cert")
    conn = dict(query["list-conns"][0]["alice-bob-v4"])
    creds = query["list-certs-by-subject"]
    lookup = lambda s: creds.get(s, [])     # noqa: E731
    # A CA-trusted peer (no pinned certificate): which certificate it sent is unknown.
    conn["remote-1"] = {**conn["remote-1"], "certs": [], "cacerts": [b"CN=ca"]}
    assert ss.resolve_conn(conn, lookup)[1] == ss.EndAuth("pubkey")
    # Two credentials with different keys under the pinned subject: ambiguous.
    conn["remote-1"] = {**conn["remote-1"], "certs": [b"CN=bob"]}
    two = lambda s: creds["CN=bob"] + creds["CN=alice"]     # noqa: E731
    assert ss.resolve_conn(conn, two)[1] == ss.EndAuth("pubkey")
    # Two auth rounds (e.g. pubkey + EAP): not understood, so unknown.
    conn["remote-2"] = {"class": b"EAP"}
    assert ss.resolve_conn(conn, lookup)[1] == ss.EndAuth("unknown")
    # The connection is gone (unloaded since): unknown.
    assert ss.resolve_conn(None, lookup) == (ss.NO_AUTH, ss.NO_AUTH)


def test_events_parsed():
    _, evs = recorded("cert")
    auth = (ss.EndAuth("pubkey", "aa"), ss.EndAuth("pubkey", "bb"))
    out = [e for name, data in evs for e in ss.parse_event(name, data, lambda ike: auth)]
    kinds = [(e.kind, e.level) for e in out]
    assert kinds == [("up", "ike"), ("up", "child"), ("rekey", "child"), ("rekey", "ike"),
                     ("down", "ike"), ("down", "child")]
    up, rekey, ike_rekey = out[1], out[2], out[3]
    assert up.new.peer == Identity("CN=bob", "pubkey", "bb") and up.old is None
    assert rekey.old_spis != rekey.new_spis and None not in rekey.old_spis + rekey.new_spis
    assert rekey.old.reqid == rekey.new.reqid and rekey.old.child_id != rekey.new.child_id
    assert up.new_spis == rekey.old_spis
    assert (ike_rekey.old_ike_id, ike_rekey.new_ike_id) == (1, 2)
    assert out[5].old.spi_in == rekey.new.spi_in and out[5].old.ike_id == 2


# -- the adapter over recorded answers ----------------------------------------------------
@pytest.mark.parametrize("auth,peer", [("cert", "CN=bob"), ("rpk", "bob.lab"),
                                       ("psk", "bob.lab")])
def test_identify_recorded(monkeypatch, auth, peer):
    src, query, calls = fake_source(monkeypatch, auth)
    ike, child = the_child(query)
    sa_in = FakeSA("10.0.0.2", "10.0.0.1", "esp", child.spi_in, child.reqid)
    sa_out = FakeSA("10.0.0.1", "10.0.0.2", "esp", child.spi_out, child.reqid)
    for sa in (sa_in, sa_out):
        ans = src.identify(sa)
        assert ans.state is State.VERIFIED and ans.peer.id == peer
        assert (ans.spi_in, ans.spi_out, ans.reqid) == (child.spi_in, child.spi_out,
                                                        child.reqid)
        assert (ans.ike_name, ans.child_name, ans.mode, ans.proto) == (
            "alice-bob-v4", "transport", "transport", "esp")
        assert (ans.peer.pubkey_sha256 is None) == (auth == "psk")
    # Anything else about the SA wrong: not charon's SA.
    for sa in (FakeSA("10.0.0.2", "10.0.0.1", "esp", child.spi_out, child.reqid),   # wrong dir
               FakeSA("10.0.0.2", "10.0.0.1", "ah", child.spi_in, child.reqid),
               FakeSA("10.0.0.2", "10.0.0.1", "esp", child.spi_in, child.reqid + 7),
               FakeSA("10.0.0.9", "10.0.0.1", "esp", child.spi_in, child.reqid),
               FakeSA("10.0.0.2", "10.0.0.1", "esp", 0x1234, 1000)):
        assert src.identify(sa).state is State.UNKNOWN, sa
    assert src.snapshot()[0].peer.id == peer


def test_follow_false_asks_every_time(monkeypatch):
    src, query, calls = fake_source(monkeypatch, "cert")
    ike, child = the_child(query)
    sa = FakeSA("10.0.0.2", "10.0.0.1", "esp", child.spi_in, child.reqid)
    src.identify(sa)
    n = calls.count("list-sas")
    src.identify(sa)
    assert calls.count("list-sas") == n + 1
    # unfollowed, nothing would tell of a charon restart: the auth data is read again too
    assert calls.count("list-conns") == 2


def test_followed_cache_hits_and_misses(monkeypatch):
    # The event thread is simulated: a registered event session makes the cache valid.
    src, query, calls = fake_source(monkeypatch, "rpk")
    src.follow, src._connected = True, True
    ike, child = the_child(query)
    sa = FakeSA("10.0.0.2", "10.0.0.1", "esp", child.spi_in, child.reqid)
    first = src.identify(sa)
    n = calls.count("list-sas")
    for _ in range(3):
        assert src.identify(sa) == first
    assert calls.count("list-sas") == n                 # hits: no round trip
    src.identify(FakeSA("10.0.0.2", "10.0.0.1", "esp", 0x4242, 0))
    assert calls.count("list-sas") == n + 1             # a miss asks the daemon
    src._handle("child-updown", {"ike": {}})            # any event invalidates
    src.identify(sa)
    assert calls.count("list-sas") == n + 2
    src._set_connected(False, "test")                   # lost: fail closed, no guess
    assert src.identify(sa).state is State.UNAVAILABLE
    assert src.next_event(0).kind == "daemon-lost"


# -- failing closed -----------------------------------------------------------------------
def test_missing_socket_is_unavailable(tmp_path):
    path = str(tmp_path / "nothing.vici")
    sa = FakeSA("10.0.0.2", "10.0.0.1", "esp", 0xc0ffee, 1)
    src = StrongSwanSource(path, follow=False)
    ans = src.identify(sa)
    assert ans.state is State.UNAVAILABLE and "nothing.vici" in ans.reason
    with pytest.raises(SourceUnavailable):
        src.snapshot()
    with StrongSwanSource(path, retry=0.05) as followed:
        ev = followed.next_event(5)
        assert ev.kind == "daemon-lost" and not followed.connected
        assert followed.identify(sa).state is State.UNAVAILABLE
        assert followed.wait_connected(0.2) is False


def test_garbage_daemon_is_unavailable(tmp_path):
    import socket
    path = str(tmp_path / "bad.vici")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve():
        for _ in range(2):
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(4096)
            c.sendall(b"\x00\x00\x00\x02\x63\x00")    # a packet of an unknown type
            c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        ans = StrongSwanSource(path, follow=False, timeout=2).identify(
            FakeSA("10.0.0.2", "10.0.0.1", "esp", 1, 1))
        assert ans.state is State.UNAVAILABLE
    finally:
        srv.close()


# -- static source and chain --------------------------------------------------------------
STATIC = {"sas": [
    {"spi": "0x1234", "proto": "esp", "dst": "10.0.0.2", "local": "alice-m", "peer": "bob-m",
     "peer_pubkey_sha256": "AB" * 32},
    {"reqid": 1000, "local": "alice-r", "peer": "bob-r"},
    {"peer_addr": "fd00::3", "local": "alice-a", "peer": "carol-a"},
]}


def test_static_rules_and_precedence():
    src = StaticSource(STATIC)
    a = src.identify(FakeSA("10.0.0.1", "10.0.0.2", "esp", 0x1234, 1000))
    assert a.state is State.VERIFIED and a.source == "static"
    assert a.peer == Identity("bob-m", "manual", "ab" * 32) and a.local.auth == "manual"
    b = src.identify(FakeSA("10.0.0.2", "10.0.0.1", "esp", 0x5678, 1000))   # by reqid
    assert b.peer.id == "bob-r"
    c = src.identify(FakeSA("fd00:0::3", "fd00::1", "esp", 0x9, 0))       # by peer address
    assert c.peer.id == "carol-a" and c.remote_addr == "fd00::3" and c.local_addr == "fd00::1"
    # SPI rule needs the same dst and proto
    assert src.identify(FakeSA("10.0.0.2", "10.0.0.1", "esp", 0x1234, 0)).state is State.UNKNOWN
    assert src.identify(FakeSA("10.0.0.1", "10.0.0.2", "ah", 0x1234, 0)).state is State.UNKNOWN
    assert src.snapshot() == [] and src.next_event(0) is None


def test_static_from_file_and_errors(tmp_path):
    p = tmp_path / "static.json"
    p.write_text(json.dumps(STATIC))
    assert len(StaticSource.from_file(str(p)).rules) == 3
    for bad in ([{"local": "a", "peer": "b"}], [{"reqid": 1, "peer": "b"}],
                [{"spi": 5, "local": "a", "peer": "b"}], ["x"]):
        with pytest.raises(StaticConfigError):
            StaticSource(bad)


class Canned:
    def __init__(self, name, state):
        self.name, self.state, self.asked = name, state, 0

    def identify(self, sa):
        self.asked += 1
        return SAIdentity(self.state, self.name, "canned",
                          peer=Identity(self.name, "manual") if self.state is State.VERIFIED
                          else None)

    def snapshot(self):
        if self.state is State.UNAVAILABLE:
            raise SourceUnavailable("down")
        return []

    def next_event(self, timeout=None):
        return None

    def close(self):
        pass


@pytest.mark.parametrize("states,expect", [
    (("verified", "verified"), ("verified", "a")),
    (("unknown", "verified"), ("verified", "b")),
    (("unknown", "unknown"), ("unknown", "chain")),
    (("unavailable", "verified"), ("unavailable", "a")),      # never a lower source's word
    (("unknown", "unavailable"), ("unavailable", "b")),       # never UNAVAILABLE -> UNKNOWN
    (("verified", "unavailable"), ("verified", "a")),
])
def test_chain_precedence(states, expect):
    a, b = Canned("a", State(states[0])), Canned("b", State(states[1]))
    ans = ChainSource([a, b]).identify(FakeSA("1.1.1.1", "2.2.2.2", "esp", 1))
    assert (ans.state.value, ans.source) == expect


def test_chain_snapshot_unavailable():
    with pytest.raises(SourceUnavailable):
        ChainSource([Canned("a", State.UNKNOWN), Canned("b", State.UNAVAILABLE)]).snapshot()
    assert ChainSource([Canned("a", State.UNKNOWN)]).next_event(0.05) is None
