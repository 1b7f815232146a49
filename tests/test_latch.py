"""The latch state machine, driven from tables: every (state, input) pair, and the RFC 5660
transitions with their causes. Sans-IO: no kernel or IKE daemon here (the lab tests join the
machine with both)."""
import itertools
import socket
from dataclasses import replace

import pytest

from ipsecchan.latch.machine import keeps
from ipsecchan.latch import (INPUTS, Alert, Block, Cause, Latch, LatchProtocolError,
                             LatchRefused, LatchState, Observation, Party, Pin, Policy,
                             Protection, Release, Requirements, SAFacts)
from ipsecchan.xfrm.messages import SA, Algorithm, Encap, Selector

GCM256 = Protection("esp", "transport", True, "rfc4106(gcm(aes))", 256, "rfc4106(gcm(aes))",
                    128)
GCM128 = Protection("esp", "transport", True, "rfc4106(gcm(aes))", 128, "rfc4106(gcm(aes))",
                    128)
CHACHA = Protection("esp", "transport", True, "rfc7539esp(chacha20,poly1305)", 256,
                    "rfc7539esp(chacha20,poly1305)", 128)
ESP_NULL = Protection("esp", "transport", False, None, 0, "hmac(sha256)", 128)
TUNNEL = Protection("esp", "tunnel", True, "rfc4106(gcm(aes))", 256, "rfc4106(gcm(aes))", 128)

ALICE = Party("CN=alice", "aa" * 32, "pubkey")
BOB = Party("CN=bob", "bb" * 32, "pubkey")
BOB_OTHER_KEY = Party("CN=bob", "cc" * 32, "pubkey")     # same name, another key: an impostor
MALLORY = Party("CN=mallory", "dd" * 32, "pubkey")


def sa(spi, *, peer=BOB, local=ALICE, prot=GCM256, reqid=1, dst="10.0.0.2"):
    return SAFacts((socket.AF_INET, dst, prot.proto, spi), reqid, prot, local, peer)


def obs(out_spi=0x100, in_spi=0x200, *, peer=BOB, prot=GCM256, in_prot=None, reqid=1,
        **kw):
    return Observation(True, "protected", "protected",
                       (sa(out_spi, peer=peer, prot=prot, reqid=reqid),),
                       (sa(in_spi, peer=peer, prot=in_prot or prot, reqid=reqid,
                           dst="10.0.0.1"),), **kw)


CLEAR = Observation(True, "no-policy", "no-policy", in_cleartext_accepted=True)
BYPASS = Observation(True, "bypass", "bypass", in_cleartext_accepted=True)
BLOCKED = Observation(True, "block", "block")
NO_SA = Observation(True, "no-sa", "protected")
UNVERIFIED = Observation(False, reason="IKE daemon unreachable")


def established(req=Requirements(), first=None):
    latch = Latch.connector(req)
    effects = latch.begin(first or obs())
    assert [type(e) for e in effects] == [Pin]
    effects = latch.confirm(first or obs())
    assert effects == [Alert(LatchState.LATCHING, LatchState.ESTABLISHED)]
    return latch


def broken(cause_obs=None):
    latch = established()
    latch.observe(cause_obs or obs(peer=MALLORY))
    assert latch.state is LatchState.BROKEN
    return latch


def closed():
    latch = established()
    latch.close()
    return latch


MAKERS = {
    LatchState.LISTENER: Latch.listener,
    LatchState.LATCHING: Latch.connector,
    LatchState.ESTABLISHED: established,
    LatchState.BROKEN: broken,
    LatchState.CLOSED: closed,
}
ALLOWED = {
    (LatchState.LISTENER, "accept"), (LatchState.LISTENER, "close"),
    (LatchState.LATCHING, "begin"), (LatchState.LATCHING, "confirm"),
    (LatchState.LATCHING, "close"),
    (LatchState.ESTABLISHED, "observe"), (LatchState.ESTABLISHED, "inbound-gone"),
    (LatchState.ESTABLISHED, "carried"), (LatchState.ESTABLISHED, "close"),
    (LatchState.BROKEN, "observe"), (LatchState.BROKEN, "close"),
}


@pytest.mark.parametrize("state,kind", list(itertools.product(LatchState, INPUTS)))
def test_every_state_and_input(state, kind):
    latch = MAKERS[state]()
    assert latch.state is state
    call = {"begin": lambda: latch.begin(obs()), "confirm": lambda: latch.confirm(obs()),
            "observe": lambda: latch.observe(obs()), "accept": lambda: latch.accept(obs()),
            "inbound-gone": lambda: latch.inbound_gone({sa(0x999).key}),
            "carried": lambda: latch.carried(latch.params, False),
            "close": latch.close}[kind]
    if (state, kind) not in ALLOWED:
        with pytest.raises(LatchProtocolError):
            call()
        assert latch.state is state                      # a refused input changes nothing
    elif (state, kind) == (LatchState.LATCHING, "confirm"):
        with pytest.raises(LatchProtocolError, match="before begin"):
            call()
    else:
        call()


# (latched with obs(), then observed) -> (state after, cause, effects' types)
OBSERVATIONS = [
    ("same SAs", obs(), LatchState.ESTABLISHED, None, []),
    ("child rekey", obs(0x101, 0x201), LatchState.ESTABLISHED, None, [Alert, Pin]),
    ("rekey to stronger-or-equal (chacha)", obs(0x102, 0x202, prot=CHACHA),
     LatchState.ESTABLISHED, None, [Alert, Pin]),
    ("rekey to a new reqid, same peer", obs(0x103, 0x203, reqid=9), LatchState.ESTABLISHED,
     None, [Alert, Pin]),
    ("rekey to weaker key", obs(0x104, 0x204, prot=GCM128), LatchState.BROKEN,
     Cause.PROTECTION_WEAKER, [Alert, Block]),
    ("rekey to ESP-null", obs(0x105, 0x205, prot=ESP_NULL), LatchState.BROKEN,
     Cause.PROTECTION_WEAKER, [Alert, Block]),
    ("mode change", obs(0x106, 0x206, prot=TUNNEL), LatchState.BROKEN,
     Cause.PROTECTION_WEAKER, [Alert, Block]),
    ("another peer", obs(0x107, 0x207, peer=MALLORY), LatchState.BROKEN,
     Cause.PEER_CHANGED, [Alert, Block]),
    ("same ID, another key", obs(0x108, 0x208, peer=BOB_OTHER_KEY), LatchState.BROKEN,
     Cause.PEER_CHANGED, [Alert, Block]),
    ("policy now bypass", BYPASS, LatchState.BROKEN, Cause.CLEARTEXT, [Alert, Block]),
    ("SPD entry gone", CLEAR, LatchState.BROKEN, Cause.CLEARTEXT, [Alert, Block]),
    ("SA gone, none to replace it", NO_SA, LatchState.BROKEN, Cause.NO_SA, [Alert, Block]),
    ("blocked by policy", BLOCKED, LatchState.BROKEN, Cause.BLOCKED, [Alert, Block]),
    ("IKE daemon gone", UNVERIFIED, LatchState.BROKEN, Cause.NOT_VERIFIED, [Alert, Block]),
    ("inbound accepts cleartext too", obs(in_cleartext_accepted=True), LatchState.BROKEN,
     Cause.CLEARTEXT, [Alert, Block]),
    ("inbound SA weaker than outbound", obs(in_prot=GCM128), LatchState.BROKEN,
     Cause.SAS_DISAGREE, [Alert, Block]),
    ("identity unknown", Observation(True, "protected", "protected",
                                     (sa(0x100, peer=None, local=None),),
                                     (sa(0x200, peer=None, local=None),)),
     LatchState.BROKEN, Cause.IDENTITY_UNKNOWN, [Alert, Block]),
]


@pytest.mark.parametrize("name,seen,state,cause,effects", OBSERVATIONS,
                         ids=[o[0] for o in OBSERVATIONS])
def test_established_observes(name, seen, state, cause, effects):
    latch = established()
    out = latch.observe(seen)
    assert latch.state is state and latch.cause is cause
    assert [type(e) for e in out] == effects
    if state is LatchState.BROKEN:
        assert out[0] == Alert(LatchState.ESTABLISHED, LatchState.BROKEN, cause, latch.detail)
        assert out[1] == Block(cause)
    if effects == [Alert, Pin] and state is LatchState.ESTABLISHED:
        assert out[0].rekeyed and latch.params.out_sas == seen.out_sas
        assert out[1] == Pin(latch.params)       # the pin follows the rekey
        assert latch.params.peer == BOB          # the latched identity never moves


def test_old_inbound_sa_leaving_after_a_rekey_is_silent():
    latch = established()
    both_in = Observation(True, "protected", "protected", (sa(0x101),),
                          (sa(0x200, dst="10.0.0.1"), sa(0x201, dst="10.0.0.1")))
    assert [type(e) for e in latch.observe(both_in)] == [Alert, Pin]     # the rekey
    assert latch.observe(obs(0x101, 0x201)) == []                        # old inbound gone
    assert latch.params.sa_keys()[1] == ((socket.AF_INET, "10.0.0.1", "esp", 0x201),)


def test_broken_resolves_when_the_latched_parameters_return():
    latch = broken()
    assert latch.observe(obs(peer=MALLORY)) == []          # still broken
    assert latch.observe(UNVERIFIED) == [] and latch.cause is Cause.NOT_VERIFIED
    out = latch.observe(obs(0x300, 0x400))                 # bob is back, new SAs
    assert latch.state is LatchState.ESTABLISHED
    assert out == [Alert(LatchState.BROKEN, LatchState.ESTABLISHED, None, "resolved"),
                   Pin(latch.params)]
    assert latch.params.sa_keys()[0] == ((socket.AF_INET, "10.0.0.2", "esp", 0x300),)
    assert [h[1] for h in latch.history] == [LatchState.ESTABLISHED, LatchState.BROKEN,
                                              LatchState.ESTABLISHED]


REFUSALS = [
    (CLEAR, Requirements(), Cause.CLEARTEXT),
    (BYPASS, Requirements(), Cause.CLEARTEXT),
    (Observation(True, "protected", "no-policy", (sa(1),), ()), Requirements(),
     Cause.CLEARTEXT),
    (BLOCKED, Requirements(), Cause.BLOCKED),
    (NO_SA, Requirements(), Cause.NO_SA),
    (UNVERIFIED, Requirements(), Cause.NOT_VERIFIED),
    (UNVERIFIED, Requirements(policy=Policy.OPTIONAL), Cause.NOT_VERIFIED),
    (obs(), Requirements(peer_id="CN=carol"), Cause.PEER_NOT_REQUIRED),
    (Observation(True, "protected", "protected", (sa(1),), (sa(2, peer=MALLORY),)),
     Requirements(), Cause.SAS_DISAGREE),
]


@pytest.mark.parametrize("seen,req,cause", REFUSALS)
def test_connect_is_refused(seen, req, cause):
    latch = Latch.connector(req)
    with pytest.raises(LatchRefused) as exc:
        latch.begin(seen)
    assert exc.value.cause is cause and latch.state is LatchState.LATCHING
    assert latch.close() == [Release()] and latch.state is LatchState.CLOSED


def test_rekey_between_the_two_looks_moves_the_pin():
    latch = Latch.connector()
    latch.begin(obs())
    out = latch.confirm(obs(0x111, 0x222))
    assert [type(e) for e in out] == [Pin, Alert] and latch.state is LatchState.ESTABLISHED
    assert latch.params.sa_keys()[0] == ((socket.AF_INET, "10.0.0.2", "esp", 0x111),)


def test_required_peer_accepted():
    latch = established(Requirements(peer_id="CN=bob"))
    assert latch.params.peer == BOB and latch.params.protected


def test_newcomer_on_the_outbound_sa_is_named_before_any_disagreement():
    """bob's old SAs still accepted inbound, mallory's now outbound: peer-changed, not a
    vaguer sas-disagree."""
    latch = established()
    seen = Observation(True, "protected", "protected", (sa(0x700, peer=MALLORY),),
                       (sa(0x200, dst="10.0.0.1"), sa(0x701, peer=MALLORY, dst="10.0.0.1")))
    out = latch.observe(seen)
    assert latch.cause is Cause.PEER_CHANGED and out[1] == Block(Cause.PEER_CHANGED)


def test_newcomer_on_an_inbound_sa_only_is_named_too():
    """The impostor's inbound SA lands first: bob's outbound still in use, but the kernel
    would accept mallory's packets for the flow."""
    latch = established()
    seen = Observation(True, "protected", "protected", (sa(0x100),),
                       (sa(0x200, dst="10.0.0.1"), sa(0x701, peer=MALLORY, dst="10.0.0.1")))
    latch.observe(seen)
    assert latch.state is LatchState.BROKEN and latch.cause is Cause.PEER_CHANGED
    assert "CN=mallory" in latch.detail


def test_sa_replaced_between_lookup_and_latch():
    """The race: bob's SA is replaced by mallory's after the first look and before the
    socket is pinned. The confirmation sees it: refused, never latched to mallory."""
    latch = Latch.connector()
    latch.begin(obs())
    with pytest.raises(LatchRefused) as exc:
        latch.confirm(obs(0x999, 0x998, peer=MALLORY))
    assert exc.value.cause is Cause.PEER_CHANGED and latch.state is LatchState.CLOSED


def test_optional_protection_latches_cleartext_knowingly():
    latch = established(Requirements(policy=Policy.OPTIONAL), first=CLEAR)
    assert latch.params.protected is False and latch.params.peer is None
    for seen in (CLEAR, obs(), UNVERIFIED, BLOCKED):
        assert latch.observe(seen) == [] and latch.state is LatchState.ESTABLISHED
    # Optional does not mean weaker when IPsec is there: a protected start latches protected.
    latch = established(Requirements(policy=Policy.OPTIONAL))
    assert latch.params.protected
    latch.observe(CLEAR)
    assert latch.state is LatchState.BROKEN and latch.cause is Cause.CLEARTEXT


def test_strict_algorithms_refuse_an_equal_strength_change():
    latch = established(Requirements(strict_algorithms=True))
    latch.observe(obs(0x101, 0x201, prot=CHACHA))
    assert latch.state is LatchState.BROKEN and latch.cause is Cause.PROTECTION_WEAKER


def test_listener_spawns_connection_latches():
    listener = Latch.listener(Requirements(peer_id="CN=bob"))
    child, effects = listener.accept(obs())
    assert listener.state is LatchState.LISTENER and [type(e) for e in effects] == [Pin]
    child.confirm(obs())
    assert child.state is LatchState.ESTABLISHED and child.requirements.peer_id == "CN=bob"
    with pytest.raises(LatchRefused):
        listener.accept(obs(peer=MALLORY))
    assert listener.close() == [Alert(LatchState.LISTENER, LatchState.CLOSED), Release()]


def _sa(algs, proto="esp", mode="transport", encap=None):
    sel = Selector(2, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
    return SA("10.0.0.1", "10.0.0.2", 2, proto, 1, 1, mode, 0, 0, sel, 0, 0, 0, 0,
              tuple(algs), encap, None, None, False, None)


def test_protection_from_kernel_algorithms():
    gcm = Protection.of(_sa([Algorithm("aead", "rfc4106(gcm(aes))", 288, 128)]))
    assert (gcm.confidential, gcm.cipher_bits, gcm.icv_bits) == (True, 256, 128)
    cbc = Protection.of(_sa([Algorithm("crypt", "cbc(aes)", 128),
                             Algorithm("auth", "hmac(sha256)", 256),
                             Algorithm("auth_trunc", "hmac(sha256)", 256, 128)]))
    assert (cbc.cipher, cbc.cipher_bits, cbc.integrity, cbc.icv_bits) == \
        ("cbc(aes)", 128, "hmac(sha256)", 128)
    ah = Protection.of(_sa([Algorithm("auth_trunc", "hmac(sha256)", 256, 128)], proto="ah"))
    assert not ah.confidential and ah.proto == "ah"
    gmac = Protection.of(_sa([Algorithm("aead", "rfc4543(gcm(aes))", 160, 128)]))
    assert not gmac.confidential and gmac.icv_bits == 128
    null = Protection.of(_sa([Algorithm("crypt", "ecb(cipher_null)", 0),
                              Algorithm("auth_trunc", "hmac(sha1)", 160, 96)]))
    assert not null.confidential
    natt = Protection.of(_sa([Algorithm("aead", "rfc4106(gcm(aes))", 160, 128)],
                             encap=Encap(2, 4500, 4500, "0.0.0.0")))
    assert natt.encapsulated and natt.cipher_bits == 128
    assert gcm.at_least(natt) and not natt.at_least(gcm)
    assert gcm.at_least(gcm, strict=True) and not gcm.at_least(cbc, strict=True)
    assert not ah.at_least(null) and not null.at_least(gcm) and gcm.at_least(cbc)


def test_pending_observation_changes_nothing():
    """A rekey's SAs reach the kernel before the IKE daemon names them: until it does (or a
    grace time ends, the engine's business), the latch neither breaks nor moves."""
    pending = Observation(True, "protected", "protected",
                          (sa(0x900, peer=None, local=None),),
                          (sa(0x901, peer=None, local=None),), pending=True)
    latch = established()
    assert latch.observe(pending) == [] and latch.state is LatchState.ESTABLISHED
    assert latch.params.sa_keys()[0] == ((socket.AF_INET, "10.0.0.2", "esp", 0x100),)
    latch = broken()
    assert latch.observe(pending) == [] and latch.state is LatchState.BROKEN
    with pytest.raises(LatchProtocolError, match="pending"):
        Latch.connector().begin(pending)


def _rekeyed_inbound():
    """A latch after a CHILD_SA rekey's first half: OUT on the new SA, IN accepting the old
    and the new inbound SA (both of reqid 1)."""
    latch = established()
    both = Observation(True, "protected", "protected", (sa(0x101),),
                       (sa(0x200, dst="10.0.0.1"), sa(0x201, dst="10.0.0.1")))
    assert [type(e) for e in latch.observe(both)] == [Alert, Pin]
    return latch


OLD_IN, NEW_IN = sa(0x200, dst="10.0.0.1").key, sa(0x201, dst="10.0.0.1").key

# (what went) -> taken in (the inbound SAs left), or None: the latch must be observed
INBOUND_GONE = [
    ("the rekey's old inbound SA", {OLD_IN}, [NEW_IN]),
    ("an SA the latch does not hold", {sa(0x999).key}, [OLD_IN, NEW_IN]),
    ("the SA carrying it out", {sa(0x101).key}, None),
    ("every inbound SA", {OLD_IN, NEW_IN}, None),
]


@pytest.mark.parametrize("name,keys,left", INBOUND_GONE, ids=[g[0] for g in INBOUND_GONE])
def test_inbound_sas_gone(name, keys, left):
    latch = _rekeyed_inbound()
    before = latch.params
    effects = latch.inbound_gone(keys)
    assert latch.state is LatchState.ESTABLISHED
    if left is None:
        assert effects is None and latch.params is before      # nothing taken in
        return
    assert effects == []
    assert [s.key for s in latch.params.in_sas] == left
    assert latch.params.out_sas == before.out_sas and latch.params.peer is before.peer
    # What it took in is what observing would have found: that observation is unchanged.
    seen = Observation(True, "protected", "protected", latch.params.out_sas,
                       latch.params.in_sas)
    assert latch.observe(seen) == []


def test_inbound_gone_leaves_bundles_and_cleartext_latches_to_an_observation():
    ah = Protection("ah", "transport", False, None, 0, "hmac(sha256)", 128)
    bundle = Observation(True, "protected", "protected", (sa(0x100), sa(0x300, prot=ah)),
                         (sa(0x200, dst="10.0.0.1"), sa(0x400, prot=ah, dst="10.0.0.1"),
                          sa(0x401, prot=ah, dst="10.0.0.1")))
    latch = established(first=bundle)
    assert latch.inbound_gone({sa(0x400, prot=ah, dst="10.0.0.1").key}) is None
    clear = established(Requirements(Policy.OPTIONAL), first=CLEAR)
    assert clear.inbound_gone({OLD_IN}) is None


def test_latches_on_the_same_sas_share_their_judgements_and_keep_their_requirements():
    # The engine hands latches on the same SAs the same tuples of SAFacts; the machine then
    # shares their parameters and judges once (memos keyed by those objects' ids). Each
    # latch's own requirements and state still decide.
    from ipsecchan.latch.machine import _established_outcome
    first = obs()
    a, b = established(first=first), established(first=first)
    assert a.params is b.params
    rekey = obs(0x101, 0x201, prot=CHACHA)
    for latch in (a, b):
        assert [type(e) for e in latch.observe(rekey)] == [Alert, Pin]
    assert a.params is b.params and a.params.out_sas is rekey.out_sas
    # The same observation and parameters under other requirements: judged apart.
    again = obs(0x102, 0x202, prot=CHACHA)       # latched: GCM256, equally strong
    lax = _established_outcome(again, a.params, Requirements())
    strict = _established_outcome(again, a.params, Requirements(strict_algorithms=True))
    assert lax[0] == "moved" and strict[:3] == ("broken", None, Cause.PROTECTION_WEAKER)
    # One of them broken by another peer: the other, not observed, stays as it was.
    a.observe(obs(0x103, 0x203, peer=MALLORY))
    assert a.state is LatchState.BROKEN and b.state is LatchState.ESTABLISHED
    assert b.params.out_sas is rekey.out_sas
    # inbound_gone keeps them sharing.
    c = established(first=first)
    d = established(first=first)
    two_in = Observation(True, "protected", "protected", first.out_sas,
                         first.in_sas + (sa(0x299, dst="10.0.0.1"),))
    c.observe(two_in)
    d.observe(two_in)
    assert c.params is d.params and len(c.params.in_sas) == 2
    assert c.inbound_gone({first.in_sas[0].key}) == d.inbound_gone({first.in_sas[0].key}) == []
    assert c.params is d.params and [s.key[3] for s in c.params.in_sas] == [0x299]


# keeps(): a class of SAs (identities and protection) the latch's judgement accepts, whatever
# the SPIs. Checked against observe() itself: a rekey onto SAs of that class keeps the latch
# ESTABLISHED exactly when keeps() says so.
KEEPS = [
    ("same class", {}, Requirements(), True),
    ("stronger cipher", {"prot": CHACHA}, Requirements(), True),
    ("stronger, strict", {"prot": CHACHA}, Requirements(strict_algorithms=True), False),
    ("weaker", {"prot": GCM128}, Requirements(), False),
    ("another peer", {"peer": MALLORY}, Requirements(), False),
    ("same ID, another key", {"peer": BOB_OTHER_KEY}, Requirements(), False),
    ("another local ID", {"local": MALLORY}, Requirements(), False),
    ("unknown", {"peer": None, "local": None}, Requirements(), False),
    ("the required peer", {}, Requirements(peer_id="CN=bob"), True),
]


@pytest.mark.parametrize("name,kw,req,expected", KEEPS, ids=[k[0] for k in KEEPS])
def test_keeps_is_the_judgement_of_a_class(name, kw, req, expected):
    latch = established(req)
    facts = sa(0x777, **kw)
    assert keeps(latch.params, facts, req) is expected
    seen = Observation(True, "protected", "protected", (facts,),
                       (sa(0x778, dst="10.0.0.1", **kw),))
    latch.observe(seen)
    assert (latch.state is LatchState.ESTABLISHED) is expected
    latch = established(req)
    assert keeps(latch.params, facts, req) is expected          # (memoized: the same)


def test_carried_gives_what_observe_gives():
    # Moved: the rekey's alert and the new pin; inbound only: nothing; other parties: a bug.
    a, b = established(), established()
    seen = obs(0x101, 0x201)
    expected = a.observe(seen)
    p = b.params
    moved = replace(p, out_sas=seen.out_sas, in_sas=seen.in_sas,
                    reqids=tuple(s.reqid for s in seen.out_sas))
    assert b.carried(moved, True) == expected == [
        Alert(LatchState.ESTABLISHED, LatchState.ESTABLISHED, rekeyed=True), Pin(moved)]
    assert b.params == a.params
    fewer = replace(moved, in_sas=())
    assert b.carried(fewer, False) == [] and b.params is fewer
    with pytest.raises(LatchProtocolError):
        b.carried(replace(moved, peer=MALLORY), True)
    assert b.params is fewer and b.state is LatchState.ESTABLISHED
