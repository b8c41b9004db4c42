"""Fixtures: a simulated site + worker for the tests that need root and a kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.world import World


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: builds network namespaces")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _need_root()
    w = World()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture()
def clean_world(world: World) -> Iterator[World]:
    """The world, checked for leaks after the test (a leak fails the test)."""
    yield world
    left = world.wait_no_leftovers()
    if left:
        # Clean up for the next test, then fail this one.
        world.larkns("gc")
        pytest.fail(f"leaked: {left}")
