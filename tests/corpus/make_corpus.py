"""Regenerate the seed corpus of tests/corpus/xfrm/ from ipsecchan.xfrm.encode:

    python3 tests/corpus/make_corpus.py

Valid XFRM messages (NEWSA, UPDSA, DELSA, EXPIRE, FLUSHSA, NEWPOLICY, UPDPOLICY, DELPOLICY,
POLEXPIRE, FLUSHPOLICY, several per buffer) and hostile variants of them (truncated, length
fields too big or too small, short attributes, ragged templates, garbage). sockpol-*.bin are
XFRM_MSG_NEWPOLICY payloads for the lookup's per-socket policy argument. The files are
deterministic: rerunning rewrites the same bytes.
"""
import dataclasses
import os
import socket
import struct

from ipsecchan._native import lib
from ipsecchan.xfrm import encode
from ipsecchan.xfrm.messages import (Algorithm, Encap, Lifetime, Policy, SA, Selector,
                                     Template)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xfrm")
INF = (1 << 64) - 1
V4, V6 = socket.AF_INET, socket.AF_INET6
ZERO = Selector(0, "", "", 0, 0, 0, 0, 0, 0, 0, 0)
LT = Lifetime(INF, INF, INF, INF, 0, 0, 0, 0)
AEAD = (Algorithm("aead", "rfc4106(gcm(aes))", 288, 128),)


def sa(fam=V4, spi=0x100, src="10.0.0.1", dst="10.0.0.2", **kw):
    base = SA(src, dst, fam, "esp", spi, 1, "transport", 0, 32, ZERO, 0, 0, 1700000000, 0, AEAD,
              None, None, None, True, None, LT, (0, 0), None)
    return dataclasses.replace(base, **kw)


def pol(direction="out", fam=V4, index=9, src="10.0.0.1", dst="10.0.0.2", plen=32, **kw):
    t = Template(fam, "0.0.0.0" if fam == V4 else "::", "0.0.0.0" if fam == V4 else "::",
                 "esp", 0, 1, "transport", False)
    base = Policy(direction, "allow", 100, index,
                  Selector(fam, src, dst, plen, plen, 0, 0, 0, 0, 0, 0), (t,), None, None, None)
    return dataclasses.replace(base, **kw)


def main():
    v6 = dict(fam=V6, src="fd00::1", dst="fd00::2")
    s4, s6 = sa(), sa(spi=0x200, **v6)
    s_tun = sa(spi=0x300, mode="tunnel", mark=(1, 0xFF), if_id=3, sec_ctx="ctx",
               encap=Encap(2, 4500, 4500, "0.0.0.0"), esn=False, replay_seq=(1, 2),
               algorithms=(Algorithm("crypt", "cbc(aes)", 128),
                           Algorithm("auth_trunc", "hmac(sha256)", 256, 128)),
               selector=Selector(V4, "10.0.0.1", "10.0.0.2", 32, 32, 6, 0, 0, 22, 0xFFFF, 0))
    p_out, p_in = pol(), pol("in", index=16, src="10.0.0.2", dst="10.0.0.1")
    p6 = pol(fam=V6, index=25, src="fd00::", dst="fd00::", plen=64, mark=(1, 1), if_id=0)
    p_tun = pol(index=33, plen=24, templates=(
        Template(V4, "10.0.0.1", "10.0.0.2", "esp", 0, 1, "tunnel", False),
        Template(V4, "0.0.0.0", "0.0.0.0", "ah", 0x300, 0, "transport", True)))
    valid = {
        "newsa-v4": encode.newsa(s4),
        "newsa-v6": encode.newsa(s6),
        "newsa-tunnel": encode.newsa(s_tun),
        "updsa": encode.newsa(dataclasses.replace(s4, bytes=10), update=True),
        "delsa": encode.delsa(s4),
        "expire-soft": encode.expire(s6, hard=False),
        "expire-hard": encode.expire(s_tun, hard=True),
        "flushsa-esp": encode.flushsa(socket.IPPROTO_ESP),
        "flushsa-any": encode.flushsa(255),
        "newpolicy-out": encode.newpolicy(p_out),
        "newpolicy-in": encode.newpolicy(p_in),
        "newpolicy-v6": encode.newpolicy(p6),
        "newpolicy-tunnel": encode.newpolicy(p_tun),
        "updpolicy": encode.newpolicy(dataclasses.replace(p_out, priority=5), update=True),
        "newpolicy-socket": encode.newpolicy(pol("out-socket", index=42)),
        "delpolicy": encode.delpolicy(p_in),
        "polexpire-hard": encode.polexpire(p6, hard=True),
        "flushpolicy": encode.flushpolicy(),
        "dump": encode.dump([s4, s6, s_tun], [p_out, p_in, p6, p_tun]),
    }
    first_attr = 16 + 224
    hostile = {
        "trunc-header": valid["newsa-v4"][:10],
        "trunc-payload": valid["newsa-v4"][:-20],
        "nlmsg-len-huge": struct.pack("=I", 0xFFFFFFFF) + valid["newsa-v4"][4:],
        "nlmsg-len-short": struct.pack("=I", 8) + valid["newsa-v4"][4:],
        "nlmsg-len-16": struct.pack("=I", 16) + valid["newpolicy-out"][4:],
        "nla-len-huge": valid["newsa-v4"][:first_attr] + struct.pack("=H", 0xFFFF)
        + valid["newsa-v4"][first_attr + 2:],
        "nla-len-zero": valid["newsa-v4"][:first_attr] + struct.pack("=H", 0)
        + valid["newsa-v4"][first_attr + 2:],
        "nla-len-3": valid["newsa-v4"][:first_attr] + struct.pack("=H", 3)
        + valid["newsa-v4"][first_attr + 2:],
        "short-mark": encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(s4)[:224]
                                     + encode.attr(lib.XFRMA_MARK, b"\1\0\0\0")),
        "short-aead": encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(s4)[:224]
                                     + encode.attr(lib.XFRMA_ALG_AEAD, b"x" * 20)),
        "sec-ctx-overlong": encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(s4)[:224]
                                           + encode.attr(lib.XFRMA_SEC_CTX,
                                                         struct.pack("=HHBBH", 8, 8, 1, 1,
                                                                     500))),
        "tmpl-ragged": encode.message(lib.XFRM_MSG_NEWPOLICY, encode.encode_policy(p_out)[:168]
                                      + encode.attr(lib.XFRMA_TMPL, bytes(65))),
        "delsa-short-embedded": encode.message(lib.XFRM_MSG_DELSA, encode.delsa(s4)[16:16 + 24]
                                               + encode.attr(lib.XFRMA_SA, bytes(30))),
        "delpolicy-short": encode.message(lib.XFRM_MSG_DELPOLICY, bytes(40)),
        "expire-short": encode.message(lib.XFRM_MSG_EXPIRE, bytes(100)),
        "polexpire-short": encode.message(lib.XFRM_MSG_POLEXPIRE, bytes(100)),
        "flushsa-empty": encode.message(lib.XFRM_MSG_FLUSHSA, b""),
        "acquire-short": encode.message(lib.XFRM_MSG_ACQUIRE, bytes(8)),
        "unknown-type": encode.message(0x7F, b"\xff" * 64),
        "unknown-attr": encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(s4)
                                       + encode.attr(0x3FFF, b"zz")),
        "nested-flags": encode.message(lib.XFRM_MSG_NEWSA, encode.encode_sa(s4)[:224]
                                       + encode.attr(lib.XFRMA_MARK | 0x8000, bytes(8))),
        "valid-then-bad": valid["newsa-v6"] + valid["newsa-v4"][:-8],
        "garbage": bytes((i * 37 + 11) & 0xFF for i in range(300)),
        "zeros": bytes(64),
    }
    os.makedirs(OUT, exist_ok=True)
    for name, data in {**valid, **hostile}.items():
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(data)
    for name, p in {"sockpol-out": pol("out-socket", index=0, plen=0),
                    "sockpol-in-tunnel": dataclasses.replace(p_tun, dir="in-socket"),
                    "sockpol-block": pol("out-socket", action="block", plen=0)}.items():
        with open(os.path.join(OUT, name + ".bin"), "wb") as f:
            f.write(encode.encode_policy(p))


if __name__ == "__main__":
    main()
