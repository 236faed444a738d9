"""How a pod's netns is keyed: the netns cookie where the kernel has SO_NETNS_COOKIE; on
an older kernel (Debian 11's 5.10) the namespace's inode, only where no eBPF program keeps
pods by cookie (iptables mode without kernel counters).  Uses this process's own netns
(setns into it needs root, as the daemon has)."""

from __future__ import annotations

import errno
import os

import pytest

from nodeproxy.capture import namespaces
from nodeproxy.capture.namespaces import Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setns needs root")


@pytest.fixture
def own_netns():
    netns = Netns.open("/proc/self/ns/net")
    yield netns
    netns.close()


def refuse_with(code: int):
    def refuse(_sock):
        raise OSError(code, os.strerror(code))
    return refuse


@pytest.mark.parametrize("kernel_keeps_pods", [True, False])
def test_the_cookie_is_the_key_where_the_kernel_has_it(own_netns, kernel_keeps_pods) -> None:
    assert own_netns.pod_key(kernel_keeps_pods) == own_netns.cookie()


def test_without_so_netns_cookie_the_inode_keys_a_pod_no_program_keeps(
        own_netns, monkeypatch) -> None:
    monkeypatch.setattr(namespaces, "netns_cookie_of", refuse_with(errno.ENOPROTOOPT))
    assert own_netns.pod_key(kernel_keeps_pods=False) == os.stat("/proc/self/ns/net").st_ino


def test_without_so_netns_cookie_programs_that_key_by_cookie_refuse_the_pod(
        own_netns, monkeypatch) -> None:
    monkeypatch.setattr(namespaces, "netns_cookie_of", refuse_with(errno.ENOPROTOOPT))
    with pytest.raises(OSError) as e:
        own_netns.pod_key(kernel_keeps_pods=True)
    assert e.value.errno == errno.ENOPROTOOPT


def test_any_other_failure_is_not_taken_for_an_old_kernel(own_netns, monkeypatch) -> None:
    monkeypatch.setattr(namespaces, "netns_cookie_of", refuse_with(errno.EBADF))
    with pytest.raises(OSError) as e:
        own_netns.pod_key(kernel_keeps_pods=False)
    assert e.value.errno == errno.EBADF
