"""Fixtures for tests that need a kernel with real IPsec.

One lab kernel (user-mode-linux when this kernel has no ESP) serves the whole session; each
test gets a fresh Lab (its own namespaces, bridge and daemons) and the lab's tear-down is
checked after it. Under CI (CI=true) a lab that cannot start fails the run, and so does any
skipped test.
"""
from __future__ import annotations

import os

import pytest

from ipsecchan.lab import Kernel, Lab, LabUnavailable

IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="session")
def lab_kernel():
    try:
        kernel = Kernel.start()
    except LabUnavailable as exc:
        if IN_CI:
            pytest.fail(f"the lab cannot start, so the IPsec tests cannot run: {exc}",
                        pytrace=False)
        pytest.skip(f"no lab: {exc}")
    yield kernel
    kernel.close()


@pytest.fixture
def lab(lab_kernel):
    lab = Lab(lab_kernel)
    try:
        yield lab
    finally:
        lab.close()          # raises if anything of the lab is left behind
        assert lab.leftovers() == []


def pytest_collection_modifyitems(items):
    for item in items:
        if {"lab", "lab_kernel"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if IN_CI and skipped and session.exitstatus == 0:
        reporter.write_line(f"CI=true: {skipped} test(s) skipped; under CI none may be", red=True)
        session.exitstatus = 1


class DropIn:
    """Runs programs that use ipsecchan.socket on lab hosts, in one of the two modes the
    socket module has: in-process (root, CAP_NET_ADMIN) or through the host's broker (as
    nobody, with no capabilities at all). Tests written against it run in both."""

    def __init__(self, lab, mode: str):
        self.lab, self.mode = lab, mode
        self.brokers = {}

    def env(self, host: str) -> dict:
        if self.mode == "inprocess":
            return {"IPSECCHAN_MODE": "inprocess", "IPSECCHAN_VICI": self.lab.vici_socket(host)}
        if host not in self.brokers:        # after the host's IKE is configured
            self.brokers[host] = self.lab.start_broker(host)
        return {"IPSECCHAN_MODE": "broker", "IPSECCHAN_BROKER": self.lab.broker_socket(host)}

    def argv(self, argv: list) -> list:
        return self.lab.unprivileged(argv) if self.mode == "broker" else argv

    def run(self, host: str, argv: list, **kw):
        return self.lab.run(host, self.argv(argv), env=self.env(host), **kw)

    def python(self, host: str, code: str, *args: str, **kw):
        return self.run(host, [self.lab.kernel.python, "-c", code, *args], **kw)

    def spawn(self, host: str, argv: list):
        return self.lab.spawn(host, self.argv(argv), env=self.env(host))


@pytest.fixture(params=["inprocess", "broker"])
def dropin(lab, request):
    return DropIn(lab, request.param)
