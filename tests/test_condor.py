"""A real one-node HTCondor pool in the simulated worker (see tests/condor.py).

These tests need HTCondor: the build in ../shared/htcondor, or an installed
one.  Without either they are skipped, except under CI (CI set), where they
are required.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.condor import Pool, release_source
from tests.world import World


@pytest.fixture(scope="module")
def pool(world: World) -> Iterator[Pool]:
    if release_source() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but no HTCondor was found (../shared/htcondor/condor-*.tar.xz)")
        pytest.skip(
            "no HTCondor: neither ../shared/htcondor/condor-*.tar.xz nor condor_master on PATH"
        )
    p = Pool(world)
    try:
        yield p
    finally:
        p.close()
        assert p.pids() == [], "the pool left processes behind"


def test_a_job_submitted_by_a_user_runs_and_keeps_its_exit_code(pool: Pool) -> None:
    cluster = pool.submit("""\
        executable = /bin/sh
        arguments = "-c 'echo hello from $(id -un); exit 3'"
        output = out.txt
        error = err.txt
        log = job.log
        should_transfer_files = NO
        queue
        """)
    ad = pool.wait_done(cluster)
    assert ad["ExitCode"] == "3", ad
    assert ad["Owner"] == "lktuser"
    assert (pool.home / "out.txt").read_text() == "hello from lktuser\n"
