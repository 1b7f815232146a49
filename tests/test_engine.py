"""Host-side parts of the latch engine: the listener pin chosen from the SPD, and latches
whose socket closed under them."""
import os
import socket

import pytest

from ipsecchan.ike.static import StaticSource
from ipsecchan.latch.engine import Latcher
from ipsecchan.latch.machine import LatchState, Requirements
from ipsecchan.latch.machine import Policy as LatchPolicy

from ipsecchan.latch.engine import listener_templates
from ipsecchan.xfrm.messages import Policy, Selector, Template

V4 = socket.AF_INET


def _pol(direction, *tmpls, action="allow", family=V4):
    sel = Selector(family, "10.0.0.1", "10.0.0.2", 32, 32, 0, 0, 0, 0, 0, 0)
    return Policy(direction, action, 100, 8, sel, tuple(tmpls), None, None, None)


def _t(proto="esp", mode="transport", src="", dst="", reqid=1, optional=False):
    return Template(V4, src, dst, proto, 0, reqid, mode, optional)


def test_one_transport_kind_gives_an_any_reqid_template():
    got = listener_templates([_pol("in", _t(reqid=1)), _pol("in", _t(reqid=2)),
                              _pol("out", _t(reqid=1)), _pol("fwd", _t(mode="tunnel"))], V4)
    assert got == [Template(V4, "", "", "esp", 0, 0, "transport", False)]


def test_ah_transport():
    assert listener_templates([_pol("in", _t("ah"))], V4)[0].proto == "ah"


def test_no_listener_pin_when_it_cannot_cover_every_peer():
    # tunnel mode names endpoints; two kinds cannot be one template; no IPsec at all.
    assert listener_templates([_pol("in", _t(mode="tunnel", src="10.0.0.2",
                                            dst="10.0.0.1"))], V4) is None
    assert listener_templates([_pol("in", _t("esp")), _pol("in", _t("ah"))], V4) is None
    assert listener_templates([_pol("in"), _pol("in", action="block")], V4) is None
    assert listener_templates([], V4) is None


def test_other_family_and_optional_templates_do_not_count():
    assert listener_templates([_pol("in", _t(), family=socket.AF_INET6),
                               _pol("in", _t("ah"))], V4)[0].proto == "ah"
    assert listener_templates([_pol("in", _t("comp", optional=True), _t())],
                              V4)[0].proto == "esp"


@pytest.mark.skipif(os.geteuid() != 0, reason="latching needs CAP_NET_ADMIN")
def test_release_after_close_and_events_for_a_closed_socket():
    # A latched socket closed before its release: the release completes (its policies went
    # with the socket), and an event for a closed one drops it instead of stopping the round.
    lat = Latcher(StaticSource({}))
    try:
        with socket.create_server(("127.0.0.1", 0)) as lsn:
            pairs = []
            for _ in range(2):
                c = socket.create_connection(lsn.getsockname(), timeout=5)
                pairs.append((c, lsn.accept()[0]))
            opt = Requirements(policy=LatchPolicy.OPTIONAL)
            h1, h2 = (lat.latch(c, opt) for c, _ in pairs)
            assert h1.state is h2.state is LatchState.ESTABLISHED
            pairs[0][0].close()
            lat.release(h1)                          # no EBADF
            assert h1.state is LatchState.CLOSED and h1.id not in lat.handles
            pairs[1][0].close()
            lat._pending.add(h2.id)
            h2.latch.state = LatchState.BROKEN       # its next observation resolves: a Pin
            lat.poll()
            assert h2.id not in lat.handles          # dropped: nothing left to enforce
            for _, s in pairs:
                s.close()
    finally:
        lat.close()
