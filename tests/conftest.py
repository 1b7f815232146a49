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
