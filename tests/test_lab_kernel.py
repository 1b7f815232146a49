"""The lab kernel itself: probing, the direct path, tear-down."""
import os
import subprocess

import pytest

from ipsecchan.lab import Kernel, probe_esp


def test_probe_agrees_with_the_kernel():
    probe = probe_esp()
    r = subprocess.run(["unshare", "--net", "ip", "xfrm", "state", "add", "src", "192.0.2.1",
                        "dst", "192.0.2.2", "proto", "esp", "spi", "0x200", "mode", "transport",
                        "aead", "rfc4106(gcm(aes))", "0x" + "22" * 20, "128"],
                       capture_output=True)
    assert probe.available == (r.returncode == 0), probe.reason


def test_lab_kernel_has_esp_and_its_probe_says_so(lab_kernel):
    r = lab_kernel.call("run", argv=[lab_kernel.python, "-m", "ipsecchan", "lab", "probe"])
    assert r["rc"] == 0, r
    assert b"installs ESP SAs" in r["stdout"]


def test_direct_mode_inside_a_kernel_with_esp(lab_kernel):
    """The demo with --kernel direct, run where the kernel has ESP (the lab kernel): the
    direct path (agent in a mount namespace of its own) does the whole job."""
    r = lab_kernel.call("run", rpc_timeout=200, timeout=180,
                        argv=[lab_kernel.python, "-m", "ipsecchan", "lab", "demo",
                              "--kernel", "direct"])
    out = r["stdout"].decode()
    assert r["rc"] == 0, out + r["stderr"].decode()
    assert "lab kernel: direct" in out
    assert "alice: strongSwan reports peer CN=bob" in out
    assert "bob: strongSwan reports peer CN=alice" in out
    # Latching and the impostor (ipsecchan.lab.demo.impostor; tests/test_lab_impostor.py).
    assert "peer ID     CN=bob (auth pubkey)" in out
    assert "latch BROKEN, cause peer-changed" in out
    assert "received 0 bytes" in out
    assert "OK: the latch followed the rekey" in out
    # The nested lab left no namespace in the outer kernel.
    assert lab_kernel.call("run", argv=["ip", "netns", "list"])["stdout"] == b""


def test_kernel_close_leaves_nothing():
    if probe_esp().available:
        pytest.skip("this kernel has ESP: no user-mode-linux to tear down")
    kernel = Kernel.start("uml")
    workdir = kernel._workdir
    pid = kernel._proc.pid
    assert os.path.isdir(workdir)
    kernel.close()
    assert not os.path.exists(workdir)
    assert subprocess.run(["pgrep", "-s", str(pid)]).returncode == 1   # no UML helper left
    assert not kernel.alive
