"""Kernel tests: a ``slow`` marker for the exhaustive case grids, skipped unless
QSPEC_SLOW_TESTS=1 (the default run keeps a covering subset and stays under ~3 minutes)."""

import os
import pathlib

import pytest

_HERE = pathlib.Path(__file__).parent.resolve()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: exhaustive kernel case grids (run with QSPEC_SLOW_TESTS=1)"
    )


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QSPEC_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow kernel case; set QSPEC_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords and _HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
