"""PID 1 of the user-mode-linux guest: prepare the guest, serve the agent, power off.

The guest's root is the host's own filesystem (hostfs), mounted read-only by the controller,
so a stray write fails instead of landing in the host's files. Everything the lab writes
goes to a tmpfs on /run. The controller talks to the agent over the guest's second console
line (/dev/tty1), which user-mode-linux connects to a socket of the controller.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import traceback
import termios
import time
import tty

from ipsecchan.lab.agent import STATE_DIR_UML, Agent
from ipsecchan.lab import rpc

CHANNEL_TTY = "/dev/tty1"

# Loaded with one modprobe call: under user-mode-linux every helper exec costs ~0.15 s, and
# the crypto layer alone would ask for ~20 modules one by one (see _load_modules).
MODULES = [
    "esp4", "esp6", "ah4", "ah6", "xfrm_user", "veth", "bridge",
    "gcm", "ghash-generic", "ctr", "seqiv", "echainiv", "authenc", "authencesn", "cbc", "hmac",
    "sha512_generic", "chacha20poly1305", "chacha_generic", "poly1305_generic", "cmac", "xcbc",
    "ccm", "drbg", "jitterentropy_rng", "udp_diag",
]

LINUX_REBOOT_CMD_POWER_OFF = 0x4321FEDC


def log(msg: str) -> None:
    # CLOCK_BOOTTIME: seconds since the guest kernel started, like the kernel's own log.
    print(f"ipsecchan-guest[{time.clock_gettime(time.CLOCK_BOOTTIME):.2f}] {msg}", flush=True)


def _mount(fstype: str, target: str, source: str | None = None) -> None:
    subprocess.run(["mount", "-t", fstype, source or fstype, target], check=True)


def _load_modules(state_dir: str) -> None:
    release = os.uname().release
    tree = f"/usr/lib/uml/modules/{release}"
    if not os.path.isdir(tree):
        raise RuntimeError(f"no module tree {tree}: is user-mode-linux installed completely?")
    # modprobe finds modules under <root>/lib/modules/<release>; the tree lives elsewhere.
    root = os.path.join(state_dir, "modroot")
    os.makedirs(os.path.join(root, "lib/modules"), exist_ok=True)
    os.symlink(tree, os.path.join(root, "lib/modules", release))
    subprocess.run(["modprobe", "-a", "-d", root, *MODULES], check=True)
    # The crypto API still calls request_module() for every template it instantiates, even
    # when the module is loaded; with no modprobe helper each call fails at once and the
    # template comes from the loaded modules (IKE setup 1.8 s -> 0.3 s under UML).
    with open("/proc/sys/kernel/modprobe", "w") as f:
        f.write("\n")


def setup() -> str:
    os.environ.update(PATH="/usr/sbin:/usr/bin:/sbin:/bin", PYTHONDONTWRITEBYTECODE="1")
    _mount("proc", "/proc")
    _mount("sysfs", "/sys")
    _mount("tmpfs", "/run", "ipsecchan-run")
    os.makedirs(STATE_DIR_UML)
    log("mounted")
    _load_modules(STATE_DIR_UML)
    log("modules loaded")
    return STATE_DIR_UML


def serve(state_dir: str) -> None:
    fd = os.open(CHANNEL_TTY, os.O_RDWR | os.O_NOCTTY)
    # TCSANOW: setraw's default TCSAFLUSH would drop input already queued.
    tty.setraw(fd, termios.TCSANOW)
    reader = os.fdopen(fd, "rb", buffering=0, closefd=False)
    writer = os.fdopen(os.dup(fd), "wb", buffering=0)
    agent = Agent(state_dir)
    log("agent ready")
    try:
        rpc.serve(reader, writer, agent.handlers())
    finally:
        agent.op_shutdown()


def main() -> None:
    log("init started")
    try:
        serve(setup())
    except BaseException:
        traceback.print_exc()
        log("guest failed")
    finally:
        # The agent runs as PID 1 itself (a fork of Python costs ~0.2 s under UML): orphans
        # it does not reap stay zombies until this power-off, which is harmless here.
        sys.stdout.flush()
        try:
            os.kill(-1, 9)
        except OSError:
            pass
        os.sync()
        ctypes.CDLL(None, use_errno=True).reboot(LINUX_REBOOT_CMD_POWER_OFF)


if __name__ == "__main__":
    main()
