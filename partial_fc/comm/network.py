"""Which network interface a job's ranks talk over: one setting for Gloo, NCCL and the rendezvous, or a guess
that never picks loopback when the ranks span several hosts (hostnames often resolve to 127.0.x.1 there)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping, MutableMapping

import psutil

INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_LOCAL_SIZES = (("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE"), ("LOCAL_WORLD_SIZE", "WORLD_SIZE"))


class NetworkError(RuntimeError):
    """No usable interface or address for the job's traffic; the message names what was looked for."""


def spans_hosts(env: Mapping[str, str]) -> bool:
    """True when the launcher says fewer ranks run on this host than in the whole job."""
    for local, world in _LOCAL_SIZES:
        if env.get(local, "").isdigit() and env.get(world, "").isdigit():
            return int(env[local]) < int(env[world])
    return False


def _ipv4_addresses() -> dict[str, list[str]]:
    up = {name for name, stats in psutil.net_if_stats().items() if stats.isup}
    return {
        name: [a.address for a in addresses if a.family == socket.AF_INET]
        for name, addresses in psutil.net_if_addrs().items()
        if name in up
    }


def interface_address(name: str) -> str:
    """The IPv4 address of the interface `name` (which must be up)."""
    addresses = _ipv4_addresses()
    if not addresses.get(name):
        raise NetworkError(
            f"network interface {name!r} has no IPv4 address here (up interfaces with one: "
            f"{', '.join(sorted(n for n, a in addresses.items() if a)) or 'none'})"
        )
    return addresses[name][0]


def interface_of(address: str) -> str | None:
    """The name of the interface that holds `address`, or None."""
    return next((name for name, found in _ipv4_addresses().items() if address in found), None)


def route_interface(peer: str) -> str | None:
    """The interface this host would use to reach `peer` (a connected UDP socket sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(peer), 9))
        except OSError:
            return None
        return interface_of(probe.getsockname()[0])


def outward_address() -> str:
    """An address other hosts can reach: the first non-loopback IPv4 address of an up interface."""
    for name, found in sorted(_ipv4_addresses().items()):
        for address in found:
            if not ipaddress.ip_address(address).is_loopback:
                return address
    raise NetworkError("no network interface with a non-loopback IPv4 address is up; set NET_IF")


def configured_interface(env: Mapping[str, str]) -> str | None:
    """The interface the user chose (GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME, which config.sh sets from NET_IF)."""
    return next((env[name] for name in INTERFACE_VARIABLES if env.get(name)), None)


def choose_interface(env: MutableMapping[str, str], peer: str | None) -> None:
    """Name the interface towards `peer` (rank 0) for Gloo and NCCL when the job spans hosts and none was set."""
    if configured_interface(env) or not spans_hosts(env) or peer is None:
        return
    name = route_interface(peer)
    if name is not None and name != "lo":
        for variable in INTERFACE_VARIABLES:
            env.setdefault(variable, name)


def rendezvous_host(env: Mapping[str, str]) -> str:
    """The address rank 0 publishes for the others: the chosen interface's, loopback on one host, else outward."""
    chosen = configured_interface(env)
    if chosen:
        return interface_address(chosen)
    if not spans_hosts(env):
        return "127.0.0.1"
    return outward_address()
