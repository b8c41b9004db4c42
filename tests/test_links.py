"""Links, addresses and default routes as larkns reads them (real kernel)."""

from __future__ import annotations

import errno
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from larkns.kernel import links, netns
from larkns.kernel.iproute import PinnedIPRoute
from tests.world import SITE4, SITE6, WORKER4, WORKER6, World, sh


@pytest.fixture()
def worker_ipr(world: World) -> Iterator[PinnedIPRoute]:
    with netns.entered(world.worker):
        ipr = PinnedIPRoute()
    with ipr:
        yield ipr


@pytest.fixture()
def scratch(world: World) -> Iterator[str]:
    """A namespace of its own (named under the world's job prefix, so the
    world removes it whatever happens)."""
    name = f"{world.netns_prefix}links"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def test_the_worker_has_the_default_routes_and_addresses_ip_shows(
    worker_ipr: PinnedIPRoute,
) -> None:
    (up0,) = worker_ipr.link_lookup(ifname="up0")
    (v4,) = worker_ipr.get_default_routes(family=socket.AF_INET)
    assert (v4.get_attr("RTA_GATEWAY"), v4.get_attr("RTA_OIF")) == (SITE4, up0)
    (v6,) = worker_ipr.get_default_routes(family=socket.AF_INET6)
    assert (v6.get_attr("RTA_GATEWAY"), v6.get_attr("RTA_OIF")) == (SITE6, up0)
    (a4,) = worker_ipr.get_addr(index=up0, family=socket.AF_INET)
    assert (a4.get_attr("IFA_ADDRESS"), a4["prefixlen"], a4["scope"]) == (WORKER4, 24, 0)
    global6 = [a for a in worker_ipr.get_addr(index=up0, family=socket.AF_INET6) if a["scope"] == 0]
    assert [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in global6] == [(WORKER6, 64)]
    assert links.kind(worker_ipr, up0) == "veth"
    assert links.is_up(worker_ipr, up0)
    assert links.kind(worker_ipr, 1) is None  # lo: a plain device
    assert worker_ipr.link_lookup(ifname="lk-nothing") == []
    assert links.index(worker_ipr, "lk-nothing") is None


def test_a_namespace_without_routes_has_no_default_route(scratch: str) -> None:
    with netns.entered(scratch), PinnedIPRoute() as ipr:
        assert ipr.get_default_routes(family=socket.AF_INET) == []
        assert ipr.get_default_routes(family=socket.AF_INET6) == []


def test_veths_are_found_by_prefix_across_a_long_dump_and_deleted_by_name(scratch: str) -> None:
    # 120 pairs: their dump spans several netlink datagrams.
    batch = "".join(f"link add lk-t{i}a type veth peer name lk-t{i}b\n" for i in range(120))
    subprocess.run(["ip", "-n", scratch, "-batch", "-"], input=batch, text=True, check=True)
    sh("ip", "link", "add", "lk-br", "type", "bridge", ns=scratch)
    with netns.entered(scratch), PinnedIPRoute() as ipr:
        found = links.veths_with_prefix(ipr, "lk-t")
        assert sorted(found) == sorted(f"lk-t{i}{e}" for i in range(120) for e in "ab")
        assert links.veths_with_prefix(ipr, "lk-br") == []  # a bridge is never larkns's
        assert links.is_veth(ipr, "lk-t0a") and not links.is_veth(ipr, "lk-br")
        idx = links.index(ipr, "lk-t0a")
        assert idx is not None and not links.is_up(ipr, idx)  # made down
        assert links.delete(ipr, "lk-t0a") is True
        assert links.delete(ipr, "lk-t0a") is False  # already gone: not an error
        assert not links.is_veth(ipr, "lk-t0b")  # its peer went with it
        assert len(links.veths_with_prefix(ipr, "lk-t")) == 238


def test_answers_come_from_the_namespace_it_was_made_in_whichever_thread_asks(
    world: World,
) -> None:
    with netns.entered(world.worker):
        ipr = PinnedIPRoute()
    # This thread is back in the host's namespace, which has no up0.
    with ipr:
        answers: list[list[int]] = []
        t = threading.Thread(target=lambda: answers.append(ipr.link_lookup(ifname="up0")))
        t.start()
        t.join()
        assert answers == [ipr.link_lookup(ifname="up0")] and answers[0]
    with pytest.raises(OSError) as closed:
        ipr.link_lookup(ifname="up0")
    assert closed.value.errno == errno.EBADF
