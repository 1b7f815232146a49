"""Host-side parts of the latch engine: the listener pin chosen from the SPD."""
import socket

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
