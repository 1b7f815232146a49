"""The lab: hosts (network namespaces on one bridge) in a kernel with real IPsec, each with
its own strongSwan charon when IKE is asked for, or manually keyed SAs.

    with Kernel.start() as kernel, Lab(kernel) as lab:
        alice, bob = lab.add_host("alice"), lab.add_host("bob")
        link = lab.ike("alice", "bob", auth="cert")
        server = lab.spawn("bob", ["python3", "-m", "ipsecchan.lab.echo", "serve", ...])

Everything the lab makes is named with a per-lab prefix, lives in the lab kernel's tmpfs,
and is removed by close(), which then checks that nothing is left.
"""
from __future__ import annotations

import copy
import ipaddress
import itertools
import os
import re
import secrets
import signal
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ipsecchan.lab import pki, swan
from ipsecchan.lab.errors import LabError
from ipsecchan.lab.kernel import Kernel
from ipsecchan.lab.rpc import RemoteError
from ipsecchan.lab.xfrmstate import XfrmState, parse_xfrm_states

HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
NET4 = ipaddress.ip_network("10.0.0.0/24")
NET6 = ipaddress.ip_network("fd00::/64")
CHILD = "transport"
CHARON_START_TIMEOUT = 20.0
IKE_TIMEOUT = 20.0

_lab_ids = itertools.count(1)


@dataclass
class Result:
    argv: list[str]
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def check(self) -> "Result":
        if self.rc != 0:
            raise LabError(f"{' '.join(self.argv)} failed (exit status {self.rc}): "
                           f"{self.stderr.decode('utf-8', 'replace').strip()}")
        return self


@dataclass
class Host:
    name: str
    netns: str
    index: int
    addr4: str
    addr6: str
    identity: pki.Identity
    dir: str                      # relative to the agent's state folder
    charon: "Process | None" = None
    connections: dict[str, dict] = field(default_factory=dict)
    secrets: dict[str, dict] = field(default_factory=dict)

    def addr(self, family: int) -> str:
        if family not in (4, 6):
            raise LabError(f"family must be 4 or 6, not {family!r}")
        return self.addr4 if family == 4 else self.addr6


class Process:
    """A background process on a lab host."""

    def __init__(self, lab: "Lab", host: str | None, argv: list[str], handle: int):
        self._lab, self.host, self.argv, self.handle = lab, host, argv, handle
        self.result: Result | None = None

    def output(self) -> Result:
        r = self._lab.kernel.call("output", handle=self.handle)
        return Result(self.argv, r["rc"], r["stdout"], r["stderr"])

    def running(self) -> bool:
        return self.result is None and self.output().rc is None

    def wait(self, timeout: float = 60) -> Result:
        if self.result is None:
            try:
                r = self._lab.kernel.call("wait", rpc_timeout=timeout + 10, handle=self.handle,
                                          timeout=timeout)
            except RemoteError as exc:
                raise LabError(f"{' '.join(self.argv)} on {self.host}: {exc}") from None
            self.result = Result(self.argv, r["rc"], r["stdout"], r["stderr"])
        return self.result

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> Result:
        """Signal the process; SIGKILL if it has not ended after `timeout`."""
        if self.result is None:
            self._lab.kernel.call("signal", handle=self.handle, sig=int(sig))
            try:
                return self.wait(timeout)
            except LabError:
                self._lab.kernel.call("signal", handle=self.handle, sig=int(signal.SIGKILL))
                return self.wait(timeout)
        return self.result


@dataclass(frozen=True)
class IkeLink:
    """An IKEv2 transport-mode CHILD_SA between two hosts (initiated by `a`)."""

    a: str
    b: str
    conn: str
    child: str
    auth: str
    family: int
    a_id: str
    b_id: str


@dataclass(frozen=True)
class Packet:
    """One captured frame, as far as the lab looks into it (IPv4/IPv6 over Ethernet)."""

    time: float
    src: str
    dst: str
    proto: int              # IP protocol number: 6 TCP, 17 UDP, 50 ESP, ...
    sport: int | None = None
    dport: int | None = None
    spi: int | None = None  # ESP (and ESP in UDP 4500)
    length: int = 0


def parse_pcap(data: bytes) -> list[Packet]:
    """Packets of a classic pcap file (Ethernet link type), IP headers and the first bytes
    of TCP, UDP and ESP; anything else (ARP, truncated frames) is left out."""
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        end = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        end = ">"
    else:
        raise LabError("not a pcap file")
    frac = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    if struct.unpack(end + "I", data[20:24])[0] != 1:
        raise LabError("pcap link type is not Ethernet")
    out, off = [], 24
    while off + 16 <= len(data):
        sec, sub, caplen, origlen = struct.unpack(end + "IIII", data[off:off + 16])
        frame = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 14:
            continue
        etype, ip = struct.unpack("!H", frame[12:14])[0], frame[14:]
        if etype == 0x0800 and len(ip) >= 20:
            hl, proto = (ip[0] & 0xF) * 4, ip[9]
            src, dst, l4 = (str(ipaddress.IPv4Address(ip[12:16])),
                            str(ipaddress.IPv4Address(ip[16:20])), ip[hl:])
        elif etype == 0x86DD and len(ip) >= 40:
            proto = ip[6]
            src, dst, l4 = (str(ipaddress.IPv6Address(ip[8:24])),
                            str(ipaddress.IPv6Address(ip[24:40])), ip[40:])
        else:
            continue
        sport = dport = spi = None
        if proto in (6, 17) and len(l4) >= 4:
            sport, dport = struct.unpack("!HH", l4[:4])
            if proto == 17 and 4500 in (sport, dport) and len(l4) >= 12 and l4[8:12] != b"\0" * 4:
                spi = struct.unpack("!I", l4[8:12])[0]      # ESP in UDP (not a NAT-T keepalive)
        elif proto == 50 and len(l4) >= 4:
            spi = struct.unpack("!I", l4[:4])[0]
        out.append(Packet(sec + sub * frac, src, dst, proto, sport, dport, spi, origlen))
    return out


class Capture:
    """tcpdump on a lab host's interface, writing a pcap file in the lab's tmpfs."""

    def __init__(self, lab: "Lab", host: str, proc: Process, path: str):
        self._lab, self.host, self.proc, self.path = lab, host, proc, path
        self.packets: list[Packet] | None = None

    def stop(self) -> list[Packet]:
        """Stop tcpdump (it flushes on SIGINT) and return the packets it saw."""
        if self.packets is None:
            self.proc.stop(signal.SIGINT)
            self.packets = parse_pcap(self._lab.kernel.call("read_file", path=self.path))
        return self.packets


@dataclass(frozen=True)
class StaticLink:
    """A manually keyed pair of SAs (and their policies) between two hosts."""

    a: str
    b: str
    family: int
    proto: str
    spi_ab: int
    spi_ba: int
    reqid: int


class Lab:
    def __init__(self, kernel: Kernel, name: str | None = None):
        self.kernel = kernel
        self.prefix = name or f"ipc{next(_lab_ids)}"
        if not HOST_NAME.match(self.prefix):
            raise LabError(f"bad lab name {self.prefix!r}")
        self.hosts: dict[str, Host] = {}
        self.procs: list[Process] = []
        self._reqids = itertools.count(1000)    # away from the reqids strongSwan hands out
        self.hub = f"{self.prefix}-hub"
        self.dir = f"labs/{self.prefix}"
        self._closed = False
        self._batch(None, [f"netns add {self.hub}"])
        try:
            self._batch(self.hub, ["link add br0 type bridge stp_state 0 mcast_snooping 0",
                                   "link set br0 up"])
        except LabError:
            self.close()
            raise

    # -- commands ---------------------------------------------------------------------------
    def _netns(self, host: str | None) -> str | None:
        return None if host is None else self.host(host).netns

    def run(self, host: str | None, argv: list[str], *, input: bytes | None = None,
            timeout: float = 60, env: dict[str, str] | None = None,
            check: bool = False) -> Result:
        """Run a command on `host` (None: the lab kernel's own namespace) and wait for it."""
        r = self.kernel.call("run", rpc_timeout=timeout + 10, argv=list(argv),
                             netns=self._netns(host), input=input, timeout=timeout, env=env)
        res = Result(list(argv), r["rc"], r["stdout"], r["stderr"])
        return res.check() if check else res

    def python(self, host: str | None, code: str, *args: str, **kw: Any) -> Result:
        """Run a Python script (source text) on `host` with the lab kernel's interpreter."""
        return self.run(host, [self.kernel.python, "-c", code, *args], **kw)

    def spawn(self, host: str | None, argv: list[str],
              env: dict[str, str] | None = None) -> Process:
        """Start a background process on `host` (a server, a daemon)."""
        handle = self.kernel.call("spawn", argv=list(argv), netns=self._netns(host), env=env)
        proc = Process(self, host, list(argv), handle)
        self.procs.append(proc)
        return proc

    def _batch(self, netns: str | None, lines: list[str]) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
        r = self.run(None, argv, input="".join(f"{line}\n" for line in lines).encode())
        if r.rc != 0:
            raise LabError(f"ip {'-n ' + netns + ' ' if netns else ''}failed: "
                           f"{(r.stderr or r.stdout).decode('utf-8', 'replace').strip()}")

    # -- hosts ------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(self.hosts) or "none yet"
            raise LabError(f"no host {name!r} in this lab (hosts: {known})") from None

    def add_host(self, name: str, *, addr4: str | None = None,
                 addr6: str | None = None) -> Host:
        if not HOST_NAME.match(name or ""):
            raise LabError(f"bad host name {name!r}: a lower-case letter, then up to 11 "
                           "letters or digits")
        if name in self.hosts:
            raise LabError(f"host {name!r} already exists")
        index = len(self.hosts) + 1
        a4 = ipaddress.ip_address(addr4 or NET4[index])
        a6 = ipaddress.ip_address(addr6 or NET6[index])
        if a4 not in NET4 or a6 not in NET6:
            raise LabError(f"addresses must lie in {NET4} and {NET6}")
        host = Host(name=name, netns=f"{self.prefix}-{name}", index=index, addr4=str(a4),
                    addr6=str(a6), identity=pki.make_identity(name),
                    dir=f"{self.dir}/{name}")
        port = f"{self.prefix}h{index}"
        # `netns add` must run in the lab kernel's own mount namespace (`ip -n` leaves it).
        self._batch(None, [
            f"netns add {host.netns}",
            f"link add {port} netns {self.hub} type veth peer name eth0 netns {host.netns}",
        ])
        self._batch(self.hub, [f"link set {port} master br0 up"])
        self.hosts[name] = host
        self._batch(host.netns, [
            "link set lo up",
            f"addr add {a4}/{NET4.prefixlen} dev eth0",
            f"addr add {a6}/{NET6.prefixlen} dev eth0 nodad",
            "link set eth0 up",
        ])
        return host

    # -- strongSwan -------------------------------------------------------------------------
    def vici_socket(self, name: str) -> str:
        return f"{self.kernel.state_dir}/{self.host(name).dir}/run/charon.vici"

    def vici(self, host: str, command: str, args: dict | None = None,
             timeout: float = 30) -> Any:
        """A VICI command to `host`'s charon (e.g. "list-sas"); streamed answers as a list."""
        if self.host(host).charon is None:
            raise LabError(f"no charon runs on {host}")
        try:
            return self.kernel.call("vici", rpc_timeout=timeout + 10,
                                    socket_path=self.vici_socket(host), command=command,
                                    args=args, timeout=timeout)
        except RemoteError as exc:
            raise LabError(f"{host}: {exc.remote_message}") from None

    def start_charon(self, *names: str, plugins: str = swan.CHARON_PLUGINS) -> None:
        """Start charon on each named host (together) and wait for their VICI sockets."""
        started = []
        for name in names:
            host = self.host(name)
            if host.charon is not None:
                continue
            base = f"{self.kernel.state_dir}/{host.dir}"
            conf = self.kernel.call("write_file", path=f"{host.dir}/strongswan.conf",
                                    data=swan.strongswan_conf(f"{base}/run/charon.vici",
                                                              f"{base}/charon.log",
                                                              plugins).encode())
            self.kernel.call("write_file", path=f"{host.dir}/run/.keep", data=b"")
            # charon's pid file is compiled in as /var/run/charon.pid: in the mount namespace
            # `ip netns exec` gives it, a tmpfs on /var with /var/run -> our folder keeps two
            # charons apart (and off the host's /var).
            host.charon = self.spawn(name, [
                "sh", "-c", 'mount -t tmpfs ipsecchan-var /var && ln -s "$0" /var/run && '
                            'exec "$1"', f"{base}/run", swan.CHARON],
                env={"STRONGSWAN_CONF": conf})
            started.append(host)
        for host in started:
            ok = self.kernel.call("wait_socket", rpc_timeout=CHARON_START_TIMEOUT + 10,
                                  path=self.vici_socket(host.name),
                                  timeout=CHARON_START_TIMEOUT, handle=host.charon.handle)
            ok = ok and self._charon_running(host)
            if not ok:
                out = host.charon.output()
                log = self.charon_log(host.name)
                how = (f"exited with status {out.rc}" if out.rc is not None else
                       f"did not open its VICI socket within {CHARON_START_TIMEOUT} s")
                host.charon.stop(signal.SIGKILL)
                host.charon = None
                raise LabError(f"charon on {host.name} {how}\n"
                               f"--- output ---\n{(out.stdout + out.stderr).decode(errors='replace')}"
                               f"--- log ---\n{log}")

    def _charon_running(self, host: Host) -> bool:
        """The VICI socket appears while plugins load, before charon knows whether it can
        run at all: wait for its worker threads (or its exit)."""
        deadline = time.monotonic() + CHARON_START_TIMEOUT
        while time.monotonic() < deadline:
            if "spawning" in self.charon_log(host.name):
                return host.charon.running()
            if not host.charon.running():
                return False
            time.sleep(0.02)
        return False

    def charon_log(self, name: str, lines: int = 60) -> str:
        try:
            text = self.kernel.call("read_file", path=f"{self.host(name).dir}/charon.log")
        except RemoteError:
            return "(no log)"
        return "\n".join(text.decode("utf-8", "replace").splitlines()[-lines:])

    def load_swanctl(self, name: str) -> None:
        """(Re)load host's connections and secrets (host.connections, host.secrets) into its
        charon with swanctl --load-all; swanctl's complaint becomes a LabError."""
        host = self.host(name)
        tree = {"connections": host.connections, "secrets": host.secrets}
        path = self.kernel.call("write_file", path=f"{host.dir}/swanctl/swanctl.conf",
                                data=swan.settings_text(tree).encode(), mode=0o600)
        r = self.run(None, [swan.SWANCTL, "--load-all", "--noprompt", "--file", path,
                            "--uri", f"unix://{self.vici_socket(name)}"],
                     env={"STRONGSWAN_CONF": f"{self.kernel.state_dir}/{host.dir}/strongswan.conf"})
        if r.rc != 0:
            raise LabError(f"{name}: swanctl rejected the configuration:\n"
                           f"{(r.stdout + r.stderr).decode('utf-8', 'replace').strip()}")

    def _put_credentials(self, host: Host, auth: str, peer: Host) -> tuple[str, str]:
        """Write the credentials `auth` needs into host's swanctl folder; returns the IDs."""
        d = f"{host.dir}/swanctl"
        me, other = host.identity, peer.identity
        if auth == "cert":
            self.kernel.call("write_file", path=f"{d}/x509/{me.name}.crt", data=me.cert_pem)
            self.kernel.call("write_file", path=f"{d}/x509/{other.name}.crt", data=other.cert_pem)
            self.kernel.call("write_file", path=f"{d}/private/{me.name}.key", data=me.key_pem,
                             mode=0o600)
            return me.dn, other.dn
        if auth == "rpk":
            self.kernel.call("write_file", path=f"{d}/pubkey/{me.name}.pub", data=me.pubkey_pem)
            self.kernel.call("write_file", path=f"{d}/pubkey/{other.name}.pub",
                             data=other.pubkey_pem)
            self.kernel.call("write_file", path=f"{d}/private/{me.name}.key", data=me.key_pem,
                             mode=0o600)
            return me.fqdn, other.fqdn
        if auth == "psk":
            return me.fqdn, other.fqdn
        raise LabError(f"unknown auth {auth!r}: cert, rpk or psk")

    def ike(self, a: str, b: str, *, auth: str = "cert", family: int = 4,
            child_options: dict[str, Any] | None = None,
            ike_options: dict[str, Any] | None = None, initiate: bool = True) -> IkeLink:
        """Configure IKEv2 between a and b (both ends), and bring the CHILD_SA up from a."""
        ha, hb = self.host(a), self.host(b)
        if ha is hb:
            raise LabError("an IKE link needs two different hosts")
        if auth not in ("cert", "rpk", "psk"):
            raise LabError(f"unknown auth {auth!r}: cert, rpk or psk")
        conn = f"{a}-{b}-v{family}"
        self.start_charon(a, b)
        psk = pki.make_psk()
        ids = {}
        for me, peer in ((ha, hb), (hb, ha)):
            local_id, remote_id = self._put_credentials(me, auth, peer)
            ids[me.name] = local_id
            suffix = {"cert": ".crt", "rpk": ".pub", "psk": None}[auth]
            me.connections[conn] = swan.connection(
                me.addr(family), peer.addr(family),
                swan.auth_section(auth, local_id, suffix and me.name + suffix),
                swan.auth_section(auth, remote_id, suffix and peer.name + suffix),
                CHILD, child_options, ike_options)
            if auth == "psk":
                me.secrets[f"ike-{conn}"] = {"id-1": local_id, "id-2": remote_id,
                                             "secret": "0x" + psk.hex()}
        # Both ends load at once: each swanctl run costs ~0.3 s under user-mode-linux.
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self.load_swanctl, (a, b)))
        link = IkeLink(a, b, conn, CHILD, auth, family, ids[a], ids[b])
        if initiate:
            self.initiate(link)
        return link

    def initiate(self, link: IkeLink) -> None:
        try:
            self.vici(link.a, "initiate", {"ike": link.conn, "child": link.child,
                                           "timeout": int(IKE_TIMEOUT * 1000)},
                      timeout=IKE_TIMEOUT + 5)
        except LabError as exc:
            raise LabError(f"IKE {link.a} -> {link.b} ({link.auth}, IPv{link.family}) failed: "
                           f"{exc}\n--- charon log {link.a} ---\n{self.charon_log(link.a, 25)}"
                           f"\n--- charon log {link.b} ---\n{self.charon_log(link.b, 25)}"
                           ) from None
        for name in (link.a, link.b):
            if not self.child_sas(name, link.conn):
                raise LabError(f"IKE {link.a} -> {link.b}: no CHILD_SA installed on {name}\n"
                               f"{self.charon_log(name, 25)}")

    def ike_sas(self, host: str, conn: str | None = None) -> list[dict]:
        """The IKE_SAs charon on `host` reports (VICI list-sas), each with its name."""
        out = []
        for item in self.vici(host, "list-sas", {"ike": conn} if conn else {}):
            for name, ike in item.items():
                out.append({"name": name, **ike})
        return out

    def child_sas(self, host: str, conn: str | None = None) -> list[dict]:
        """Installed CHILD_SAs on `host`, each with its IKE_SA's IDs."""
        out = []
        for ike in self.ike_sas(host, conn):
            for child in (ike.get("child-sas") or {}).values():
                if child.get("state") == "INSTALLED":
                    out.append({**child, "ike": ike["name"], "local-id": ike.get("local-id"),
                                "remote-id": ike.get("remote-id")})
        return out

    # -- another peer at a known peer's address ---------------------------------------------
    def accept_peer(self, link: IkeLink, peer: str) -> IkeLink:
        """Let link.a accept a second identity at link.b's address: `peer`, with its own key
        and certificate (or raw key), as a multi-peer or leap-of-faith configuration would.

        link.a gets a second connection for the same address pair that pins peer's
        credential; `peer` gets its mirror, with link.b's address as its local address.
        Nothing is initiated: move the address to `peer` first (del_address / add_address),
        then lab.initiate(the returned link), which runs from `peer`."""
        ha, hb, hp = self.host(link.a), self.host(link.b), self.host(peer)
        if hp is ha or hp is hb:
            raise LabError("the other peer must be a third host")
        if link.auth not in ("cert", "rpk"):
            raise LabError(f"accept_peer needs keys (cert or rpk), not {link.auth!r}")
        conn = f"{link.conn}-{peer}"
        self.start_charon(peer)
        ids = {me.name: self._put_credentials(me, link.auth, other)[0]
               for me, other in ((ha, hp), (hp, ha))}
        suffix = ".crt" if link.auth == "cert" else ".pub"
        mine = copy.deepcopy(ha.connections[link.conn])
        mine["remote"] = swan.auth_section(link.auth, ids[peer], peer + suffix)
        ha.connections[conn] = mine
        theirs = copy.deepcopy(hb.connections[link.conn])
        theirs["local"] = swan.auth_section(link.auth, ids[peer], peer + suffix)
        hp.connections[conn] = theirs
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(self.load_swanctl, (link.a, peer)))
        return IkeLink(peer, link.a, conn, link.child, link.auth, link.family, ids[peer],
                       ids[link.a])

    def _prefixlen(self, addr: str) -> int:
        a = ipaddress.ip_address(addr)
        if a not in NET4 and a not in NET6:
            raise LabError(f"{addr} lies in neither {NET4} nor {NET6}")
        return NET4.prefixlen if a.version == 4 else NET6.prefixlen

    def del_address(self, name: str, addr: str) -> None:
        """Take an address off host's eth0 (the Host record keeps its own addresses)."""
        self._batch(self.host(name).netns, [f"addr del {addr}/{self._prefixlen(addr)} dev eth0"])

    def add_address(self, name: str, addr: str) -> None:
        """Put an address on host's eth0, and forget the host's neighbours, so that its next
        packet to a peer starts with an ARP request (or neighbour solicitation), which
        tells that peer the address's new link-layer address. (Moving an IPv6 address to
        another host this way is not yet working: the peer never heard the new host.)"""
        extra = " nodad" if ipaddress.ip_address(addr).version == 6 else ""
        self._batch(self.host(name).netns, [
            f"addr add {addr}/{self._prefixlen(addr)} dev eth0{extra}",
            "neigh flush dev eth0"])

    def capture(self, name: str, iface: str = "eth0", timeout: float = 10) -> Capture:
        """Start tcpdump on host's interface (every frame, first 128 bytes); Capture.stop()
        returns the packets."""
        host = self.host(name)
        self.kernel.call("write_file", path=f"{host.dir}/.keep", data=b"")
        rel = f"{host.dir}/capture-{len(self.procs)}.pcap"
        path = f"{self.kernel.state_dir}/{rel}"
        proc = self.spawn(name, ["tcpdump", "-i", iface, "-n", "-U", "--immediate-mode", "-s",
                                 "128", "-Z", "root", "-w", path])
        deadline = time.monotonic() + timeout
        while True:
            out = proc.output()
            if b"listening on" in out.stderr:
                return Capture(self, name, proc, rel)
            if out.rc is not None or time.monotonic() > deadline:
                proc.stop(signal.SIGKILL)
                why = ("tcpdump is not installed (apt-get install tcpdump)" if out.rc == 127
                       or b"No such file" in out.stderr else
                       f"tcpdump did not start: {out.stderr.decode(errors='replace').strip()}")
                raise LabError(f"capture on {name}: {why}")
            time.sleep(0.05)

    # -- manual keying ----------------------------------------------------------------------
    def static_sa(self, a: str, b: str, *, family: int = 4) -> StaticLink:
        """Install a manually keyed ESP transport SA pair and policies between a and b
        (AES-GCM-128, random keys and SPIs), on both hosts, with no IKE daemon."""
        ha, hb = self.host(a), self.host(b)
        if ha is hb:
            raise LabError("a static link needs two different hosts")
        reqid = next(self._reqids)
        spi_ab, spi_ba = (0x10000 + secrets.randbelow(0x7FFF0000) for _ in range(2))
        key_ab, key_ba = (secrets.token_bytes(20).hex() for _ in range(2))  # key + 4-byte salt
        src, dst = ha.addr(family), hb.addr(family)
        states = [
            f"xfrm state add src {src} dst {dst} proto esp spi {spi_ab:#x} reqid {reqid} "
            f"mode transport aead 'rfc4106(gcm(aes))' 0x{key_ab} 128",
            f"xfrm state add src {dst} dst {src} proto esp spi {spi_ba:#x} reqid {reqid} "
            f"mode transport aead 'rfc4106(gcm(aes))' 0x{key_ba} 128",
        ]
        for me, peer in ((ha, hb), (hb, ha)):
            mine, theirs = me.addr(family), peer.addr(family)
            tmpl = "proto esp reqid {} mode transport".format(reqid)
            self._batch(me.netns, states + [
                f"xfrm policy add src {mine} dst {theirs} dir out "
                f"tmpl src {mine} dst {theirs} {tmpl}",
                f"xfrm policy add src {theirs} dst {mine} dir in "
                f"tmpl src {theirs} dst {mine} {tmpl}",
            ])
        return StaticLink(a, b, family, "esp", spi_ab, spi_ba, reqid)

    # -- traffic ----------------------------------------------------------------------------
    def tcp_exchange(self, client: str, server: str, *, family: int = 4, port: int = 5000,
                     count: int = 20, timeout: float = 60) -> tuple[Result, Result]:
        """TCP from client to server: `count` checked round trips of ~1 KB (ipsecchan.lab.echo)."""
        addr = self.host(server).addr(family)
        echo = [self.kernel.python, "-m", "ipsecchan.lab.echo"]
        srv = self.spawn(server, [*echo, "serve", addr, str(port)])
        try:
            cli = self.run(client, [*echo, "client", addr, str(port), str(count)],
                           timeout=timeout).check()
            return cli, srv.wait(timeout).check()
        finally:
            srv.stop()

    # -- the kernel's view, read with iproute2 (independent of ipsecchan's own XFRM code) ---
    def xfrm_states(self, host: str) -> list[XfrmState]:
        return parse_xfrm_states(self.run(host, ["ip", "-s", "xfrm", "state"], check=True).text)

    # -- tear-down --------------------------------------------------------------------------
    def namespaces(self) -> list[str]:
        """This lab's network namespaces that exist in the kernel now."""
        r = self.run(None, ["ip", "netns", "list"], check=True)
        names = [line.split()[0] for line in r.text.splitlines() if line.strip()]
        return [n for n in names if n.startswith(self.prefix + "-")]

    def leftovers(self) -> list[str]:
        """What of this lab still exists in the kernel (namespaces, processes, files)."""
        left = [f"namespace {n}" for n in self.namespaces()]
        left += [f"process {' '.join(p.argv)}" for p in self.procs if p.running()]
        r = self.run(None, ["ls", "-A", f"{self.kernel.state_dir}/labs"])
        left += [f"file {self.kernel.state_dir}/labs/{f}" for f in r.text.split()
                 if f == self.prefix]
        return left

    def broker_socket(self, name: str) -> str:
        """Where `start_broker(name)` has the host's broker listen (IPSECCHAN_BROKER)."""
        return f"{self.kernel.state_dir}/{self.dir}/brokers/{self.host(name).name}.sock"

    def start_broker(self, name: str, *args: str) -> Process:
        """`ipsecchan daemon` on the host (its charon's identities), reachable by any user;
        returns once it listens."""
        path = self.broker_socket(name)
        self.run(None, ["mkdir", "-p", os.path.dirname(path)], check=True)
        self.run(None, ["chmod", "755", os.path.dirname(os.path.dirname(path)),
                        os.path.dirname(path)], check=True)
        proc = self.spawn(name, [self.kernel.python, "-m", "ipsecchan.broker.server",
                                 "--socket", path, "-v", *args],
                          env={"IPSECCHAN_VICI": self.vici_socket(name)})
        deadline = time.monotonic() + 15
        while b"listening on" not in proc.output().stdout:
            if not proc.running() or time.monotonic() > deadline:
                out = proc.stop()
                raise LabError(f"the broker on {name} did not start: "
                               f"{out.stderr.decode(errors='replace')[-1000:]}")
            time.sleep(0.05)
        return proc

    def unprivileged(self, argv: list[str], uid: int = 65534, gid: int = 65534) -> list[str]:
        """`argv` (a Python command: argv[0] is the lab's interpreter) run as an unprivileged
        user with no capabilities at all. The interpreter may live where that user cannot
        enter (under /root): then its installation is bind-mounted into this lab's folder,
        and the command runs it from there."""
        python = argv[0]
        if python == self.kernel.python:
            python = self._reachable_python(uid, gid)
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--", python, *argv[1:]]

    def _reachable_python(self, uid: int, gid: int) -> str:
        if getattr(self, "_pyroot", None):
            return self._pyroot
        probe = self.run(None, ["setpriv", f"--reuid={uid}", f"--regid={gid}",
                                "--clear-groups", self.kernel.python, "-c", "0"])
        if probe.rc == 0:
            return self.kernel.python
        prefix = self.run(None, [self.kernel.python, "-c", "import sys; print(sys.prefix)"],
                          check=True).text.strip()
        mnt = f"{self.kernel.state_dir}/{self.dir}/pyroot"
        self.run(None, ["mkdir", "-p", mnt], check=True)
        self.run(None, ["mount", "--bind", "-o", "ro", prefix, mnt], check=True)
        self.run(None, ["chmod", "755", f"{self.kernel.state_dir}/{self.dir}"], check=True)
        rel = os.path.relpath(self.kernel.python, prefix)
        self._pyroot = f"{mnt}/{rel}"
        return self._pyroot

    def close(self) -> None:
        """Stop every process, delete every namespace and file of this lab, then check."""
        if self._closed or not self.kernel.alive:
            self._closed = True
            return
        self._closed = True
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=3)
                self.kernel.call("forget", handle=proc.handle)
            except Exception as exc:   # keep tearing down; report at the end
                errors.append(f"stopping {' '.join(proc.argv)}: {exc}")
        if getattr(self, "_pyroot", None):
            r = self.run(None, ["umount", f"{self.kernel.state_dir}/{self.dir}/pyroot"])
            if r.rc != 0:
                errors.append(f"unmounting the interpreter: {r.stderr.decode(errors='replace')}")
        for ns in self.namespaces():
            # Anything still inside (a process started by hand in the namespace) is killed.
            pids = self.run(None, ["ip", "netns", "pids", ns]).text.split()
            if pids:
                self.run(None, ["kill", "-9", *pids])
            r = self.run(None, ["ip", "netns", "del", ns])
            if r.rc != 0:
                errors.append(f"deleting namespace {ns}: {r.stderr.decode(errors='replace')}")
        try:
            self.kernel.call("remove", path=self.dir)
        except RemoteError as exc:
            errors.append(f"removing {self.dir}: {exc}")
        deadline = time.monotonic() + 5
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left or errors:
            raise LabError("lab tear-down incomplete: " + "; ".join(errors + left))

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
