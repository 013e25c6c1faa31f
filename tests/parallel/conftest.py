"""Parallel tests run under plain pytest (size 1) and under `mpirun -np 2` / `-np 3`.

A failed test on one rank would leave its peers blocked in the next collective, so any failure
under size > 1 ends this rank at once; mpirun then ends the others (the same fail-fast rule the
product follows). pytest-timeout is the last guard against a hang.
"""
import os

import pytest

from hvdinfer import runtime


@pytest.fixture(scope="session")
def rt() -> runtime.Runtime:
    return runtime.init_runtime(runtime.RuntimeConfig(seed=1234))


def pytest_configure(config):
    rt = runtime.init_runtime(runtime.RuntimeConfig(seed=1234))
    if not rt.is_coordinator:
        config.option.verbose = -1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and runtime.launcher_size() > 1:
        print(f"\nrank {runtime.launcher_rank()}: {item.nodeid} failed:\n{report.longreprtext}", flush=True)
        os._exit(1)
