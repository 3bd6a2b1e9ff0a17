"""The interface and address choice for jobs across hosts (partial_fc.comm.network)."""

from __future__ import annotations

import pytest

from partial_fc.comm import network
from partial_fc.comm.network import NetworkError, choose_interface, interface_address, rendezvous_host, spans_hosts


def test_a_job_spans_hosts_when_fewer_ranks_run_here_than_in_the_job():
    assert spans_hosts({"OMPI_COMM_WORLD_LOCAL_SIZE": "8", "OMPI_COMM_WORLD_SIZE": "16"})
    assert not spans_hosts({"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_SIZE": "2"})
    assert spans_hosts({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"})
    assert not spans_hosts({})


def test_one_host_rendezvous_on_loopback_and_a_named_interface_on_its_address():
    assert rendezvous_host({"OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_SIZE": "2"}) == "127.0.0.1"
    assert rendezvous_host({"GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert interface_address("lo") == "127.0.0.1"


def test_an_unknown_interface_is_one_clear_error_listing_the_interfaces():
    with pytest.raises(NetworkError, match=r"'nosuch0' has no IPv4 address here \(up interfaces with one: .*lo"):
        interface_address("nosuch0")


def test_across_hosts_the_rendezvous_never_uses_loopback(monkeypatch):
    monkeypatch.setattr(network, "_ipv4_addresses", lambda: {"lo": ["127.0.0.1"], "eth0": ["10.1.2.3"]})
    assert rendezvous_host({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}) == "10.1.2.3"
    monkeypatch.setattr(network, "_ipv4_addresses", lambda: {"lo": ["127.0.0.1"]})
    with pytest.raises(NetworkError, match="set NET_IF"):
        rendezvous_host({"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"})


def test_the_interface_towards_rank_0_is_named_for_gloo_and_nccl_only_when_needed(monkeypatch):
    monkeypatch.setattr(network, "route_interface", lambda peer: "eth7")
    across = {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}
    choose_interface(across, "10.0.0.1")
    assert across["GLOO_SOCKET_IFNAME"] == across["NCCL_SOCKET_IFNAME"] == "eth7"
    chosen = {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "ib0"}
    choose_interface(chosen, "10.0.0.1")
    assert "NCCL_SOCKET_IFNAME" not in chosen  # the user's choice (NET_IF) stands
    local = {"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    choose_interface(local, "127.0.0.1")
    assert "GLOO_SOCKET_IFNAME" not in local
