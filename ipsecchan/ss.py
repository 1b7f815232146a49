"""`ipsecchan ss`: every TCP and UDP socket, joined with the kernel's IPsec view of its flow.

One table instead of `ss`, `ip xfrm` and `swanctl` side by side: for each socket with a peer,
the policy the kernel applies in each direction (main SPD), the SA its packets leave through
and the SAs the kernel accepts for its inbound packets.

Without CAP_NET_ADMIN (the SAD/SPD cannot be read), the host's broker (`ipsecchan daemon`)
answers instead, for root and the groups its --operators names: it looks each socket's flow
up in its own kernel view and asks its IKE daemon (so --vici is then the broker's). Anyone
else is told it may not.

Sockets come from sock_diag (NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY dumps). We speak it on a
standard-library netlink socket with the project's bounds-checked walker rather than through
pyroute2's DiagSocket, because DiagSocket disables NLMSG_ERROR handling (its Marshal keys on the
family byte, so `error_type = -1`): a refused or failed dump would come back as a short list of
sockets, which this command must not pass off as the whole table. Its get_sock_stats() is also
declared work in progress, and the import alone costs ~0.2 s.

Where the kernel has no sock_diag handler for a protocol (udp_diag not loaded: the dump answers
ENOENT), the protocol's /proc/net table of this network namespace is read instead (no socket
mark there).

JSON (`--json`): an array, one object per socket, with these keys:

    proto        "tcp" | "udp"
    family       4 | 6
    state        ss's name: ESTAB, LISTEN, SYN-SENT, SYN-RECV, FIN-WAIT-1, FIN-WAIT-2,
                 TIME-WAIT, UNCONN, CLOSE-WAIT, LAST-ACK, CLOSING
    local, local_port, peer, peer_port     addresses as text, ports as numbers
    inode, uid   the socket's inode and owner
    mark         SO_MARK (null when the kernel did not say: no CAP_NET_ADMIN, /proc fallback)
    users        [{"name", "pid", "fd"}] processes holding the socket (from /proc/*/fd)
    ipsec        null for sockets without a peer (listening, unconnected); otherwise:
      status     "protected"   both directions through SAs, no cleartext accepted inbound
                 "unprotected" neither direction protected (no policy, or a bypass policy)
                 "partial"     one direction protected, or IN also accepts cleartext
                 "no-sa"       a policy requires IPsec but no SA satisfies it (yet)
                 "blocked"     a policy (or the default policy) drops the flow
      identity   who is behind the OUT SA, as the IKE daemon (--vici) says; null with no SA
                 or --no-ike: {"state": verified|unknown|unavailable, "source", "reason",
                 "local", "peer": null | {"id", "auth", "pubkey_sha256"}}. unknown: the
                 daemon has no such SA (e.g. manually keyed); unavailable: it cannot be asked
      out, in    {"verdict": protected|bypass|block|no-policy|no-sa,
                  "policy": null | {"dir", "index", "priority", "action"},
                  "sas": [SA...]}   OUT: the SA per template in use; IN: the SAs accepted;
                 "in" also has "cleartext_accepted" (bool)
      SA         {"spi" (int), "spi_hex" ("0x%08x"), "proto" (esp|ah|comp), "mode", "src",
                  "dst", "reqid", "algorithms": [{"kind", "name", "key_bits", "salt_bits",
                  "icv_bits", "text"}]}
    latch        the socket's RFC 5660 latch, from the status service of the process that
                 latched it (ipsecchan.latch.status, joined by inode): null when no service
                 reports one; else the service's latch object ("id", "role", "state",
                 "cause", "detail", "flow", "local", "peer", "protection", "out_spis",
                 "in_spis", ...); {"state": "UNKNOWN", "reason"} when the service of a
                 process holding the socket could not be read, or a service claims a socket
                 its process does not hold

Algorithm notation (`text`, and the human table): NAME:KEY[+SALT][/ICV] in bits, e.g.
`rfc4106(gcm(aes)):256+32/128` (AES-256-GCM, 32-bit salt, 128-bit ICV), `cbc(aes):128`,
`hmac(sha256):256/128` (truncated to 128 bits). The kernel counts the salt in the key of the
RFC 4106/4309/4543/7539 and RFC 3686 algorithms; we split it off. Compression: just the name.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import struct
import sys
import textwrap
from dataclasses import dataclass, field

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_MARK = 15

# struct inet_diag_msg: family, state, timer, retrans, then struct inet_diag_sockid (sport,
# dport big-endian; src, dst 16 bytes each; if; cookie[2]), expires, rqueue, wqueue, uid, inode.
_DIAG_MSG = struct.Struct("=BBBB2H16s16sI8sIIIII")
assert _DIAG_MSG.size == 72

# Kernel TCP states (include/net/tcp_states.h), named as ss names them.
STATE_NAMES = {1: "ESTAB", 2: "SYN-SENT", 3: "SYN-RECV", 4: "FIN-WAIT-1", 5: "FIN-WAIT-2",
               6: "TIME-WAIT", 7: "UNCONN", 8: "CLOSE-WAIT", 9: "LAST-ACK", 10: "LISTEN",
               11: "CLOSING", 12: "NEW-SYN-RECV"}
ALL_STATES = (1 << 13) - 2
TCP_LISTEN, TCP_CLOSE, TCP_TIME_WAIT, TCP_SYN_RECV = 10, 7, 6, 3
# ss's default ("connected") set, and what -l shows (UDP's unconnected sockets are CLOSE).
CONNECTED_STATES = ALL_STATES & ~((1 << TCP_LISTEN) | (1 << TCP_CLOSE) | (1 << TCP_TIME_WAIT)
                                  | (1 << TCP_SYN_RECV))
LISTENING_STATES = (1 << TCP_LISTEN) | (1 << TCP_CLOSE)

PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

# Bits of nonce/salt the kernel counts in these algorithms' keys.
SALT_BITS = {"rfc4106(gcm(aes))": 32, "rfc4543(gcm(aes))": 32, "rfc4309(ccm(aes))": 24,
             "rfc7539esp(chacha20,poly1305)": 32, "rfc3686(ctr(aes))": 32}

PER_SOCKET_NOTE = ("Per-socket policies (setsockopt IP_XFRM_POLICY, e.g. charon's IKE sockets) "
                   "appear in the kernel's SPD dump without the socket that holds them, so they "
                   "cannot be attributed: every row shows the main SPD's answer, which a "
                   "per-socket policy on that socket would override.")


class SockDiagError(OSError):
    """The socket table could not be read whole."""


@dataclass
class Sock:
    proto: str
    family: int            # 4 or 6
    state: str
    local: str
    local_port: int
    peer: str
    peer_port: int
    inode: int
    uid: int
    mark: int | None = None
    ifindex: int = 0
    users: list[dict] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return self.peer_port != 0 and not ipaddress.ip_address(self.peer).is_unspecified


# ---- sockets: sock_diag ----

def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[:4])
    return socket.inet_ntop(family, raw)


def _diag_dump(family: int, proto: int, states: int) -> list[tuple]:
    """(inet_diag_msg fields, mark) of every socket of one family and protocol. A dump that
    fails part-way (e.g. ENOENT: no udp_diag module) raises SockDiagError."""
    from ipsecchan.netlink import dump, split_attributes   # native: load on use
    req = struct.pack("=BBBxI", family, proto, 0, states) + bytes(48)
    out = []
    for payload in dump(NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, req, SOCK_DIAG_BY_FAMILY,
                        SockDiagError, "sock_diag"):
        if len(payload) < _DIAG_MSG.size:
            continue
        mark = None
        for a in split_attributes(payload[_DIAG_MSG.size:]):
            if a.type == INET_DIAG_MARK and len(a.value) >= 4:
                mark = int.from_bytes(a.value[:4], sys.byteorder)
        out.append((_DIAG_MSG.unpack_from(payload), mark))
    return out


def _from_diag(proto: str, family: int, fields: tuple, mark: int | None) -> Sock:
    (_fam, state, _timer, _retrans, sport, dport, src, dst, ifindex, _cookie, _expires,
     _rq, _wq, uid, inode) = fields
    return Sock(proto, 4 if family == socket.AF_INET else 6, STATE_NAMES.get(state, str(state)),
                _addr(family, src), socket.ntohs(sport), _addr(family, dst), socket.ntohs(dport),
                inode, uid, mark, ifindex)


def _proc_net(proto: str, family: int, states: int) -> list[Sock]:
    """The /proc/net/{tcp,udp}[6] table of this network namespace (no mark there)."""
    name = f"/proc/net/{proto}{'6' if family == socket.AF_INET6 else ''}"
    out = []
    with open(name) as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) < 10:
                continue
            (laddr, lport), (raddr, rport) = (p.split(":") for p in parts[1:3])
            state = int(parts[3], 16)
            if not states & (1 << state):
                continue
            # Addresses are the kernel's __be32 words printed as host-order hex.
            lraw, rraw = (b"".join(struct.pack("=I", int(a[i:i + 8], 16))
                                   for i in range(0, len(a), 8)) for a in (laddr, raddr))
            out.append(Sock(proto, 4 if family == socket.AF_INET else 6,
                            STATE_NAMES.get(state, str(state)), _addr(family, lraw),
                            int(lport, 16), _addr(family, rraw), int(rport, 16),
                            int(parts[9]), int(parts[7])))
    return out


def list_sockets(protos=("tcp", "udp"), families=(4, 6), states: int = ALL_STATES,
                 users: bool = True) -> list[Sock]:
    """The TCP/UDP sockets of this network namespace in the given states (a bit mask of kernel
    TCP states), with their owning processes unless users=False."""
    socks = []
    for proto in protos:
        for fam in families:
            af = FAMILIES[fam]
            try:
                socks += [_from_diag(proto, af, f, mark)
                          for f, mark in _diag_dump(af, PROTOS[proto], states)]
            except SockDiagError as exc:
                if exc.errno != errno.ENOENT:      # ENOENT: no diag module for this protocol
                    raise
                socks += _proc_net(proto, af, states)
    if users:
        owners = socket_users({s.inode for s in socks if s.inode})
        for s in socks:
            s.users = owners.get(s.inode, [])
    return socks


def socket_users(inodes: set[int] | None = None, proc: str = "/proc") -> dict[int, list[dict]]:
    """{inode: [{"name", "pid", "fd"}]} from /proc/*/fd links "socket:[inode]". Processes
    that end during the scan, or whose fds we may not read, are passed over."""
    owners: dict[int, list[dict]] = {}
    try:
        pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
    except OSError:
        return owners
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:            # gone, or not ours to read
            continue
        name = None
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            try:
                inode = int(target[8:-1])
            except ValueError:
                continue
            if inodes is not None and inode not in inodes:
                continue
            if name is None:
                try:
                    with open(f"{proc}/{pid}/comm") as f:
                        name = f.read().rstrip("\n")
                except OSError:
                    name = "?"
            owners.setdefault(inode, []).append({"name": name, "pid": pid, "fd": int(fd)})
    for lst in owners.values():
        lst.sort(key=lambda u: (u["pid"], u["fd"]))
    return owners


# ---- the IPsec view ----

def make_index(sas, policies):
    """The SAD/SPD lookup index (the C one) over one dump; the one place that names it."""
    from ipsecchan.xfrm.index import Index
    idx = Index()
    idx.load(sas, policies)
    return idx


def read_kernel_view():
    """(index, number of per-socket policies) from a fresh SAD/SPD dump. Raises XfrmError
    (EPERM without CAP_NET_ADMIN): never a partial or empty view in place of the real one."""
    from ipsecchan.xfrm import dump_policies, dump_sas
    from ipsecchan.xfrm.netlink_xfrm import get_default_policy
    sas, policies = dump_sas(), dump_policies()
    index = make_index(sas, policies)
    # A flow no policy matches is dropped, not sent in clear, where the default is block.
    index.default_in, index.default_out = get_default_policy()
    return index, sum(1 for p in policies if p.per_socket)


def flow_of(sock: Sock):
    """The Flow the kernel sees for a connected socket (IPv4-mapped IPv6 peers travel as
    IPv4); None for a socket without a peer."""
    from ipsecchan.xfrm.lookup import Flow
    if not sock.connected:
        return None
    family, local, peer = FAMILIES[sock.family], sock.local, sock.peer
    if sock.family == 6:
        lm = ipaddress.IPv6Address(local).ipv4_mapped
        pm = ipaddress.IPv6Address(peer).ipv4_mapped
        if pm is not None:
            family, peer = socket.AF_INET, str(pm)
            local = str(lm) if lm is not None else "0.0.0.0"
    return Flow(family, PROTOS[sock.proto], local, sock.local_port, peer, sock.peer_port,
                mark=sock.mark or 0, ifindex=sock.ifindex)


def algorithm_dict(alg) -> dict:
    salt = SALT_BITS.get(alg.name, 0) if alg.key_bits > SALT_BITS.get(alg.name, 0) else 0
    return {"kind": alg.kind, "name": alg.name, "key_bits": alg.key_bits - salt,
            "salt_bits": salt, "icv_bits": alg.icv_bits, "text": format_algorithm(alg)}


def format_algorithm(alg) -> str:
    """NAME:KEY[+SALT][/ICV], bits; e.g. rfc4106(gcm(aes)):256+32/128."""
    if alg.kind == "comp" or (alg.key_bits == 0 and not alg.icv_bits):
        return alg.name
    salt = SALT_BITS.get(alg.name, 0)
    key = f"{alg.key_bits - salt}+{salt}" if 0 < salt < alg.key_bits else str(alg.key_bits)
    return f"{alg.name}:{key}" + (f"/{alg.icv_bits}" if alg.icv_bits else "")


def sa_dict(sa) -> dict:
    return {"spi": sa.spi, "spi_hex": f"0x{sa.spi:08x}", "proto": sa.proto, "mode": sa.mode,
            "src": sa.src, "dst": sa.dst, "reqid": sa.reqid,
            "algorithms": [algorithm_dict(a) for a in sa.algorithms]}


def _policy_dict(pol) -> dict | None:
    if pol is None:
        return None
    return {"dir": pol.dir, "index": pol.index, "priority": pol.priority, "action": pol.action}


def status_of(lookup) -> str:
    from ipsecchan.xfrm.lookup import BLOCK, BYPASS, NO_POLICY, NO_SA
    verdicts = (lookup.out.verdict, lookup.inbound.verdict)
    if BLOCK in verdicts:
        return "blocked"
    if NO_SA in verdicts:
        return "no-sa"
    if lookup.protected:
        return "protected"
    if all(v in (NO_POLICY, BYPASS) for v in verdicts):
        return "unprotected"
    return "partial"


def identity_dict(sa, identities) -> dict | None:
    """Who is behind the SA, as the IKE daemon says (None: no source asked)."""
    if identities is None or sa is None:
        return None
    ans = identities.identify(sa)
    d = {"state": ans.state.value, "source": ans.source, "reason": ans.reason or None}
    for end in ("local", "peer"):
        who = getattr(ans, end)
        d[end] = None if who is None else {"id": who.id, "auth": who.auth,
                                           "pubkey_sha256": who.pubkey_sha256}
    return d


def ipsec_dict(lookup, identities=None) -> dict:
    out, inb = lookup.out, lookup.inbound
    return {"status": status_of(lookup),
            "identity": identity_dict(out.sas[0] if out.sas else None, identities),
            "out": {"verdict": out.verdict, "policy": _policy_dict(out.policy),
                    "sas": [sa_dict(s) for s in out.sas]},
            "in": {"verdict": inb.verdict, "policy": _policy_dict(inb.policy),
                   "sas": [sa_dict(s) for s in inb.sas],
                   "cleartext_accepted": inb.cleartext_accepted}}


def sock_dict(sock: Sock, index, identities=None) -> dict:
    flow = flow_of(sock)
    return {"proto": sock.proto, "family": sock.family, "state": sock.state,
            "local": sock.local, "local_port": sock.local_port, "peer": sock.peer,
            "peer_port": sock.peer_port, "inode": sock.inode, "uid": sock.uid,
            "mark": sock.mark, "users": sock.users,
            "ipsec": None if flow is None or index is None
            else ipsec_dict(index.lookup(flow), identities)}


# ---- latches ----

@dataclass
class Latches:
    """What the latch status services say: latch objects by socket inode (with the pid of
    the service that reported each), and the processes whose service could not be read."""
    by_inode: dict[int, tuple[int | None, dict]] = field(default_factory=dict)
    unreadable: dict[int, str] = field(default_factory=dict)     # pid -> why
    everything_unknown: str | None = None      # the services could not even be listed
    # Inodes whose latch the broker reported: it read the socket from the descriptor itself,
    # so its word stands even where this user cannot see which processes hold the socket.
    from_broker: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)              # for stderr


def read_latches() -> Latches:
    from ipsecchan.latch import status
    out = Latches()
    try:
        replies = status.query_all("list")
    except OSError as exc:
        out.everything_unknown = f"the latch status services cannot be listed: {exc}"
        out.errors.append(out.everything_unknown)
        return out
    for r in replies:
        pid = r.pid if r.pid is not None else r.server.pid
        latches = r.reply.get("latches") if r.reply is not None else None
        why = r.error if r.error is not None else (
            None if isinstance(latches, list) else "answer without a list of latches")
        if why is not None:
            if pid is not None:
                out.unreadable[pid] = why
            out.errors.append(f"latches of pid {pid} unknown: @{r.server.name}: {why}")
            continue
        for latch in latches:
            if isinstance(latch, dict) and isinstance(latch.get("inode"), int):
                out.by_inode[latch["inode"]] = (r.pid, latch)
    _broker_latches(out)
    return out


def _broker_latches(out: Latches) -> None:
    """The latches the host's broker holds for its clients (root and its operator groups
    may list them). Without a broker socket there is nothing to add; a broker that cannot
    be read is said on stderr (which of its clients' sockets it latches is then unknown)."""
    from ipsecchan.broker.client import OperatorFeed, broker_path
    path = broker_path()
    if not os.path.exists(path):
        return
    try:
        feed = OperatorFeed(path)
        try:
            latches = feed.list_all()
        finally:
            feed.close()
    except (OSError, ValueError) as exc:
        out.errors.append(f"latches held by the broker ({path}) unknown: {exc}")
        return
    for latch in latches:
        owner = latch.get("owner") or {}
        if isinstance(latch.get("inode"), int):
            out.by_inode[latch["inode"]] = (owner.get("pid"), latch)
            out.from_broker.add(latch["inode"])


def _broker_feed():
    """(OperatorFeed, None) when the host's broker will answer this user's lookups, else
    (None, why not)."""
    from ipsecchan.broker.client import OperatorFeed, broker_path
    path = broker_path()
    if not os.path.exists(path):
        return None, None
    try:
        feed = OperatorFeed(path)
    except OSError as exc:
        return None, f"the broker ({path}) cannot be reached: {exc}"
    try:
        feed.request({"op": "lookup", "flows": []})    # may this user ask?
    except (OSError, ValueError) as exc:
        feed.close()
        return None, f"the broker ({path}) refused: {exc}"
    return feed, None


def latch_of(row: dict, latches: Latches) -> dict | None:
    """The latch ss shows for a row. None only when every process holding the socket
    answered and none reported a latch on it: never "no latch" for "could not tell"."""
    if latches.everything_unknown:
        return {"state": "UNKNOWN", "reason": latches.everything_unknown}
    pids = {u["pid"] for u in row["users"]}
    unread = sorted(pids & set(latches.unreadable))
    if unread:
        return {"state": "UNKNOWN", "reason": f"the status service of pid {unread[0]}: "
                                              f"{latches.unreadable[unread[0]]}"}
    hit = latches.by_inode.get(row["inode"]) if row["inode"] else None
    if hit is None:
        return None
    pid, latch = hit
    if pid not in pids and row["inode"] not in latches.from_broker:
        # Abstract socket names are anyone's to take: a latch counts only from a process
        # that holds the socket.
        return {"state": "UNKNOWN",
                "reason": f"pid {pid} reports a latch on a socket it does not hold"}
    return latch


# ---- selection ----

def _net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or ADDR/PLEN: {text!r}") from None


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return n


def _in_net(addr: str, net) -> bool:
    a = ipaddress.ip_address(addr)
    if a.version == 6 and a.ipv4_mapped is not None and net.version == 4:
        a = a.ipv4_mapped
    return a.version == net.version and a in net


def states_for(opts) -> int:
    if opts.all:
        return ALL_STATES
    return LISTENING_STATES if opts.listening else CONNECTED_STATES


def select(rows: list[dict], opts) -> list[dict]:
    out = []
    for r in rows:
        if opts.sport is not None and r["local_port"] != opts.sport:
            continue
        if opts.dport is not None and r["peer_port"] != opts.dport:
            continue
        if opts.src is not None and not _in_net(r["local"], opts.src):
            continue
        if opts.dst is not None and not _in_net(r["peer"], opts.dst):
            continue
        status = r["ipsec"] and r["ipsec"]["status"]
        if opts.protected and status != "protected":
            continue
        if opts.unprotected and status not in ("unprotected", "partial"):
            continue
        out.append(r)
    return out


# ---- the human table ----

def _hostport(addr: str, port: int, family: int, peer: bool, numeric: bool, proto: str) -> str:
    a = f"[{addr}]" if family == 6 else addr
    if port == 0 and peer:
        return f"{a}:*"
    if not numeric:
        try:
            return f"{a}:{socket.getservbyport(port, proto)}"
        except OSError:
            pass
    return f"{a}:{port}"


def _spis(sas: list[dict]) -> str:
    return ",".join(f"{s['proto']}:{s['spi_hex']}" for s in sas)


def _policy_text(view: dict) -> str:
    parts = []
    for d in ("out", "in"):
        p = view[d]["policy"]
        if p is not None:
            parts.append(f"{d}#{p['index']}({p['priority']})")
    return ",".join(parts) or "-"


def table_row(r: dict, numeric: bool) -> list[str]:
    users = ",".join(f'("{u["name"]}",pid={u["pid"]},fd={u["fd"]})' for u in r["users"])
    row = [r["proto"], r["state"],
           _hostport(r["local"], r["local_port"], r["family"], False, numeric, r["proto"]),
           _hostport(r["peer"], r["peer_port"], r["family"], True, numeric, r["proto"])]
    v = r["ipsec"]
    if v is None:
        row += ["-"] * 7
    else:
        out, inb = v["out"], v["in"]
        out_txt = _spis(out["sas"]) if out["sas"] else out["verdict"]
        in_txt = _spis(inb["sas"]) if inb["sas"] else inb["verdict"]
        if inb["sas"] and inb["cleartext_accepted"]:
            in_txt += ",clear"
        sas = out["sas"] or inb["sas"]
        modes = ",".join(dict.fromkeys(s["mode"] for s in sas)) or "-"
        algs = ",".join(dict.fromkeys(a["text"] for s in sas for a in s["algorithms"])) or "-"
        row += [v["status"], _peer_text(v.get("identity")), out_txt, in_txt, modes, algs,
                _policy_text(v)]
    row.insert(6, _latch_text(r.get("latch")))
    row.append(f"users:({users})" if users else "")
    return row


HEADER = ["Netid", "State", "Local Address:Port", "Peer Address:Port", "IPsec", "Peer-ID",
          "Latch", "Out-SA", "In-SA", "Mode", "Algorithms", "Policy", "Process"]


def _latch_text(latch: dict | None) -> str:
    if latch is None:
        return "-"
    if latch["state"] == "UNKNOWN":
        return "unknown"
    if latch["state"] == "BROKEN" and latch.get("cause"):
        return f"BROKEN({latch['cause']})"
    return latch["state"]


def _peer_text(ident: dict | None) -> str:
    if ident is None:
        return "-"
    if ident["state"] != "verified":
        return ident["state"]          # unknown / unavailable: never a guess
    peer = ident["peer"]
    return peer["id"] + (" (key)" if peer["pubkey_sha256"] else f" ({peer['auth']})")


def format_table(rows: list[dict], numeric: bool = False) -> str:
    lines = [HEADER] + [table_row(r, numeric) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines) + "\n"


# ---- the command ----

EPILOG = f"""\
Columns: IPsec is protected | unprotected | partial | no-sa | blocked (meanings under
--json below). Peer-ID is the IKE identity behind the outbound SA ("(key)" when a public key
authenticated it), or unknown / unavailable. Latch is the socket's latch as the latching
process's status service reports it: LISTENER, LATCHING, ESTABLISHED, BROKEN(cause); "-"
when no service reports one; "unknown" when the service of a process holding the socket
could not be read (said on stderr). Out-SA is the SA (proto:SPI) outbound packets take, In-SA the SAs accepted
inbound (",clear" when cleartext is accepted too); when there is none, the verdict: no-policy,
bypass, block or no-sa. Algorithms: NAME:KEY[+SALT][/ICV] in bits, e.g.
rfc4106(gcm(aes)):256+32/128. Policy: DIR#INDEX(PRIORITY) of the main-SPD policy applied in
each direction. Sockets without a peer (listening, unconnected UDP) show "-".

{textwrap.fill(PER_SOCKET_NOTE, 92)}

Needs CAP_NET_ADMIN (to read the SAD/SPD over XFRM netlink); without it, exit status 2 and no
table: no socket is ever shown unprotected when the SPD could not be read.

{{json_doc}}
"""


def _json_doc() -> str:
    doc = __doc__ or ""          # None under python -OO
    i, j = doc.find("JSON (`--json`)"), doc.find("Algorithm notation")
    return doc[i:j].rstrip() if 0 <= i < j else "JSON keys: see the ipsecchan.ss module."


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ss", help="TCP/UDP sockets with the kernel's IPsec view of each",
                       description="Every TCP and UDP socket of this network namespace, "
                                   "joined with the IPsec policy and SAs the kernel applies "
                                   "to its flow.",
                       epilog=EPILOG.format(json_doc=_json_doc()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-t", "--tcp", action="store_true", help="TCP sockets")
    p.add_argument("-u", "--udp", action="store_true", help="UDP sockets (neither: both)")
    p.add_argument("-4", dest="ipv4", action="store_true", help="IPv4 only")
    p.add_argument("-6", dest="ipv6", action="store_true", help="IPv6 only")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-l", "--listening", action="store_true",
                   help="only listening (TCP) and unconnected (UDP) sockets")
    g.add_argument("-a", "--all", action="store_true", help="sockets in every state")
    p.add_argument("-n", "--numeric", action="store_true", help="do not name ports")
    p.add_argument("--json", action="store_true", help="a JSON array, one object per socket")
    p.add_argument("--vici", metavar="PATH", default="/var/run/charon.vici",
                   help="strongSwan's VICI socket, for the peer identities (Peer-ID)")
    p.add_argument("--no-ike", action="store_true", help="do not ask the IKE daemon")
    p.add_argument("--sport", type=_port, help="local port")
    p.add_argument("--dport", type=_port, help="peer port")
    p.add_argument("--src", type=_net, metavar="ADDR[/PLEN]", help="local address in")
    p.add_argument("--dst", type=_net, metavar="ADDR[/PLEN]", help="peer address in")
    g2 = p.add_mutually_exclusive_group()
    g2.add_argument("--protected", action="store_true",
                    help="only sockets whose flow is protected both ways")
    g2.add_argument("--unprotected", action="store_true",
                    help="only sockets with a direction in cleartext (unprotected or partial)")
    p.set_defaults(func=run)
    return p


def collect(opts, index=None, latches: Latches | None = None, broker=None) -> list[dict]:
    """The selected rows; the index is built from a fresh dump and the latches are read
    from the status services unless given. `broker`: an OperatorFeed that answers for the
    kernel and the IKE daemon instead (no CAP_NET_ADMIN here)."""
    protos = [p for p, on in (("tcp", opts.tcp), ("udp", opts.udp)) if on] or ["tcp", "udp"]
    families = [f for f, on in ((4, opts.ipv4), (6, opts.ipv6)) if on] or [4, 6]
    if index is None and broker is None:
        index, _n = read_kernel_view()
    socks = list_sockets(protos, families, states_for(opts))
    if latches is None:
        latches = read_latches()
    if broker is not None:
        rows = [sock_dict(s, None) for s in socks]
        flows = [(row, flow) for row, s in zip(rows, socks)
                 if (flow := flow_of(s)) is not None]
        answers = broker.lookup([f for _row, f in flows],
                                ike=not getattr(opts, "no_ike", True))
        for (row, _flow), ipsec in zip(flows, answers):
            row["ipsec"] = ipsec
    else:
        identities = None
        if not getattr(opts, "no_ike", True):
            from ipsecchan.ike.strongswan import StrongSwanSource
            identities = StrongSwanSource(opts.vici, follow=False)
        try:
            rows = [sock_dict(s, index, identities) for s in socks]
        finally:
            if identities is not None:
                identities.close()
    for row in rows:
        row["latch"] = latch_of(row, latches)
    return select(rows, opts)


def run(opts) -> int:
    from ipsecchan.xfrm import XfrmError
    broker = None
    n_socket_policies = 0
    try:
        index, n_socket_policies = read_kernel_view()
    except (XfrmError, PermissionError) as exc:
        index = None
        why = exc.strerror or str(exc)
        denied = exc.errno in (errno.EPERM, errno.EACCES)
        hint = " (needs CAP_NET_ADMIN in this network namespace)" if denied else ""
        if denied:
            # Without the capability, the host's broker answers for operators it allows.
            broker, refused = _broker_feed()
            if refused:
                hint += f"; {refused}"
        if broker is None:
            print(f"ipsecchan ss: cannot read the kernel's IPsec state (SAD/SPD): {why}{hint}",
                  file=sys.stderr)
            return 2
    try:
        latches = read_latches()
        try:
            rows = collect(opts, index, latches, broker)
        except ConnectionError as exc:
            print(f"ipsecchan ss: the broker stopped answering: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            what = "the broker's answer" if broker is not None and exc.strerror and \
                exc.strerror.startswith("broker:") else "the socket table"
            print(f"ipsecchan ss: cannot read {what}: {exc}", file=sys.stderr)
            return 2
    finally:
        if broker is not None:
            broker.close()
    for err in latches.errors:
        print(f"ipsecchan ss: {err}", file=sys.stderr)
    if n_socket_policies and any(r["ipsec"] for r in rows):
        print(f"ipsecchan ss: note: {n_socket_policies} per-socket polic"
              f"{'y' if n_socket_policies == 1 else 'ies'} in the SPD cannot be tied to "
              "sockets; rows show the main SPD (see --help)", file=sys.stderr)
    if opts.json:
        print(json.dumps(rows, indent=1))
    else:
        sys.stdout.write(format_table(rows, opts.numeric))
    return 0
