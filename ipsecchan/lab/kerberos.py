"""A real MIT Kerberos realm in the lab: a KDC (krb5kdc) on one lab host, principals and
keytabs made with kadmin.local, and the environment that points clients and services at it.

    kdc = Kdc.start(lab, "kdc")                       # realm LAB.TEST, KDC at kdc's address
    password = kdc.add_user("alice")
    kdc.kinit("alice", "alice", password)             # a TGT in alice's credential cache
    kdc.add_service("echo/bob.lab", "bob")            # its keytab in bob's folder
    lab.spawn("bob", [...], env=kdc.env("bob"))       # KRB5_CONFIG, KRB5_KTNAME, ...

Nothing is written under /etc or /var (under user-mode-linux they are the host's, read-only):
every file lives in the lab's state folder, every program gets its paths from KRB5_CONFIG,
KRB5_KDC_PROFILE, KRB5CCNAME, KRB5_KTNAME and KRB5RCACHEDIR, and Lab.close() removes it all.
The lab has no DNS: krb5.conf names the KDC by address and turns every name lookup off, so
services are named as principals (echo/bob.lab@LAB.TEST), never as host names to resolve.
"""
from __future__ import annotations

import secrets
import signal
import time

from ipsecchan.lab.errors import LabError
from ipsecchan.lab.lab import Lab, Process
from ipsecchan.lab.rpc import RemoteError

REALM = "LAB.TEST"
KDC_START_TIMEOUT = 20.0


class Kdc:
    """An MIT KDC for `realm` on lab host `host` (its database and logs in that host's folder)."""

    def __init__(self, lab: Lab, host: str, realm: str = REALM):
        self.lab, self.host, self.realm = lab, host, realm
        self.addr = lab.host(host).addr(4)
        self._rel = f"{lab.host(host).dir}/kdc"
        self.dir = f"{lab.kernel.state_dir}/{self._rel}"
        self.krb5_conf = f"{self.dir}/krb5.conf"
        self.kdc_conf = f"{self.dir}/kdc.conf"
        self.proc: Process | None = None

    @classmethod
    def start(cls, lab: Lab, host: str, realm: str = REALM) -> "Kdc":
        """Write the realm's configuration, create its database and start krb5kdc."""
        kdc = cls(lab, host, realm)
        kdc._configure()
        kdc._run(["kdb5_util", "create", "-s", "-r", realm, "-P", secrets.token_hex(16)])
        kdc.proc = lab.spawn(host, ["krb5kdc", "-n", "-r", realm], env=kdc.env(host))
        kdc._wait_ready()
        return kdc

    def _configure(self) -> None:
        write = self.lab.kernel.call
        write("write_file", path=f"{self._rel}/krb5.conf", data=(
            "[libdefaults]\n"
            f"    default_realm = {self.realm}\n"
            # No DNS in the lab: no lookups for KDCs, realms or canonical host names.
            "    dns_lookup_kdc = false\n"
            "    dns_lookup_realm = false\n"
            "    dns_canonicalize_hostname = false\n"
            "    rdns = false\n"
            "[realms]\n"
            f"    {self.realm} = {{\n"
            f"        kdc = {self.addr}:88\n"
            "    }\n"
            "[domain_realm]\n"
            f"    .lab = {self.realm}\n").encode())
        write("write_file", path=f"{self._rel}/kdc.conf", data=(
            "[kdcdefaults]\n"
            "    kdc_ports = 88\n"
            "    kdc_tcp_ports = 88\n"
            "[realms]\n"
            f"    {self.realm} = {{\n"
            f"        database_name = {self.dir}/principal\n"
            f"        key_stash_file = {self.dir}/stash\n"
            f"        acl_file = {self.dir}/kadm5.acl\n"
            "    }\n"
            "[logging]\n"
            f"    default = FILE:{self.dir}/kdc.log\n").encode())

    def _run(self, argv: list[str], input: bytes | None = None) -> str:
        r = self.lab.run(self.host, argv, input=input, env=self.env(self.host), check=True)
        return (r.stdout + r.stderr).decode("utf-8", "replace")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + KDC_START_TIMEOUT
        while time.monotonic() < deadline:
            if "commencing operation" in self.log():
                return
            if not self.proc.running():
                break
            time.sleep(0.05)
        out = self.proc.stop(signal.SIGKILL)
        said = (out.stdout + out.stderr).decode(errors="replace")
        raise LabError(f"krb5kdc on {self.host} did not start (exit status {out.rc}): {said}"
                       f"\n--- kdc.log ---\n{self.log()}")

    def log(self) -> str:
        try:
            return self.lab.kernel.call("read_file", path=f"{self._rel}/kdc.log").decode(
                "utf-8", "replace")
        except RemoteError:      # not written yet
            return ""

    # -- principals -------------------------------------------------------------------------
    def _kadmin(self, command: str, expect: str) -> None:
        # kadmin.local exits 0 even when its command fails: its output says whether it worked.
        # The command goes on stdin, which keeps passwords out of the lab's process list.
        out = self._run(["kadmin.local", "-r", self.realm], input=f"{command}\n".encode())
        if expect not in out:
            raise LabError(f"kadmin.local on {self.host}: {command.split()[0]} failed:\n{out}")

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    def add_user(self, name: str, password: str | None = None) -> str:
        """A user principal with a password (random unless given); returns the password."""
        password = password or secrets.token_urlsafe(18)
        self._kadmin(f"addprinc -pw {password} {self.principal(name)}",
                     f'Principal "{self.principal(name)}" created')
        return password

    def add_service(self, name: str, host: str) -> str:
        """A service principal with random keys, exported to a keytab in `host`'s folder
        (KRB5_KTNAME of env(host)); returns the keytab's path."""
        principal = self.principal(name)
        self._kadmin(f"addprinc -randkey {principal}", f'Principal "{principal}" created')
        keytab = self._host_dir(host) + "/keytab"
        self._kadmin(f"ktadd -k {keytab} {principal}", "added to keytab")
        return keytab

    def kinit(self, host: str, name: str, password: str) -> None:
        """Get a TGT for `name` into host's credential cache (KRB5CCNAME of env(host)), asking
        the KDC over the lab's network."""
        r = self.lab.run(host, ["kinit", self.principal(name)], input=f"{password}\n".encode(),
                         env=self.env(host))
        if r.rc != 0:
            raise LabError(f"kinit {self.principal(name)} on {host} failed: "
                           f"{r.stderr.decode(errors='replace').strip()}\n"
                           f"--- kdc.log ---\n{self.log()}")

    # -- clients and services ---------------------------------------------------------------
    def _host_dir(self, host: str) -> str:
        rel = f"{self.lab.host(host).dir}/krb5"
        # The replay cache folder must exist: an acceptor cannot fall back to /var/tmp.
        self.lab.kernel.call("write_file", path=f"{rel}/rcache/.keep", data=b"")
        return f"{self.lab.kernel.state_dir}/{rel}"

    def env(self, host: str, trace: bool = False) -> dict[str, str]:
        """The environment for Kerberos programs on `host`: this realm's configuration and
        the host's own credential cache, keytab and replay cache (KRB5_TRACE if `trace`)."""
        d = self._host_dir(host)
        env = {"KRB5_CONFIG": self.krb5_conf, "KRB5_KDC_PROFILE": self.kdc_conf,
               "KRB5CCNAME": f"FILE:{d}/ccache", "KRB5_KTNAME": f"FILE:{d}/keytab",
               "KRB5RCACHEDIR": f"{d}/rcache"}
        if trace:
            env["KRB5_TRACE"] = f"{d}/trace.log"
        return env

    def trace(self, host: str) -> str:
        try:
            return self.lab.kernel.call("read_file", path=f"{self.lab.host(host).dir}/krb5/"
                                        "trace.log").decode("utf-8", "replace")
        except RemoteError:      # not written yet
            return ""

    def stop(self) -> None:
        """Stop krb5kdc (Lab.close() would too, with the rest of the lab)."""
        if self.proc is not None:
            self.proc.stop()
