"""Bad input and failures: a clear error, and nothing left behind."""
import os
import subprocess

import pytest

from ipsecchan.lab import Kernel, Lab, LabError, LabUnavailable, probe_esp
from ipsecchan.lab import swan


def test_unknown_host_is_a_clear_error(lab):
    lab.add_host("alice")
    before = lab.namespaces()
    with pytest.raises(LabError, match=r"no host 'carol' in this lab \(hosts: alice\)"):
        lab.run("carol", ["true"])
    with pytest.raises(LabError, match="no host 'carol'"):
        lab.ike("alice", "carol")
    assert lab.namespaces() == before


@pytest.mark.parametrize("name", ["", "Alice", "a b", "1host", "x" * 13, "../etc"])
def test_bad_host_names_are_refused(lab, name):
    with pytest.raises(LabError, match="bad host name"):
        lab.add_host(name)
    assert lab.namespaces() == [lab.hub]


def test_charon_that_fails_to_start(lab):
    lab.add_host("alice")
    # Without a kernel-ipsec backend charon gives up at once.
    plugins = swan.CHARON_PLUGINS.replace("kernel-netlink ", "")
    with pytest.raises(LabError, match="charon on alice (exited|did not open)") as err:
        lab.start_charon("alice", plugins=plugins)
    assert "--- log ---" in str(err.value)
    assert lab.host("alice").charon is None
    assert lab.run(None, ["pgrep", "-x", "charon"]).rc == 1


def test_config_that_swanctl_rejects(lab):
    lab.add_host("alice")
    lab.add_host("bob")
    with pytest.raises(LabError, match="swanctl rejected the configuration"):
        lab.ike("alice", "bob", child_options={"esp_proposals": "aes999-nosuchalg"})


def test_failure_inside_a_lab_leaves_nothing(lab_kernel):
    names = []
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(lab_kernel) as lab:
            lab.add_host("alice")
            lab.add_host("bob")
            lab.start_charon("alice", "bob")
            lab.spawn("bob", ["sleep", "600"])
            names = lab.namespaces()
            raise RuntimeError("boom")
    assert len(names) == 3
    assert lab.leftovers() == []
    assert lab.run(None, ["pgrep", "-x", "charon"]).rc == 1
    assert lab.run(None, ["pgrep", "-x", "sleep"]).rc == 1


def test_guest_cannot_write_the_hosts_files(lab):
    lab.add_host("alice")
    # The lab's own files live in tmpfs, in either kind of lab kernel.
    mounts = lab.run(None, ["findmnt", "-n", "-o", "FSTYPE", "-T", lab.kernel.state_dir], check=True)
    assert mounts.text.split()[-1] == "tmpfs"
    if lab.kernel.kind != "uml":
        return      # a direct lab runs on the host itself: there is no guest to confine
    r = lab.run("alice", ["sh", "-c", "echo x > /root/.ipsecchan-write-test"])
    assert r.rc != 0 and b"Read-only file system" in r.stderr
    assert not os.path.exists("/root/.ipsecchan-write-test")


def test_agent_refuses_paths_outside_its_state_folder(lab_kernel):
    with pytest.raises(Exception, match="outside the lab's state folder"):
        lab_kernel.call("write_file", path="../../etc/passwd", data=b"x")


def test_no_esp_and_no_uml_is_a_clear_error(tmp_path):
    probe = probe_esp()
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    missing = str(tmp_path / "no-such-linux.uml")
    if probe.available:
        pytest.skip("this kernel has ESP: the lab never needs user-mode-linux here")
    with pytest.raises(LabUnavailable) as err:
        Kernel.start("auto", uml=missing)
    msg = str(err.value)
    assert "cannot install an ESP SA" in msg and "user-mode-linux is not installed" in msg
    assert "apt-get install user-mode-linux" in msg
    assert set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) == before


def test_uml_that_cannot_boot_is_a_clear_error(tmp_path):
    fake = tmp_path / "linux.uml"
    fake.write_text("#!/bin/sh\necho 'kernel panic: no memory' ; exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(LabUnavailable, match="(?s)did not start.*kernel panic: no memory"):
        Kernel.start("uml", uml=str(fake))
    assert subprocess.run(["pgrep", "-f", str(fake)]).returncode == 1
