"""Simulated hosts for multi-host tests: network namespaces on a bridge, each with its own address, reached by
mpirun through an rsh agent and by horovodrun through an `ssh` shim; optionally each with a host-local disk.

Traffic stays on the bridge the harness makes (a /24 no interface here uses) and on loopback; every namespace,
link and mount it makes is removed on exit, also when the test fails."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.launchers import training_process_of

SSH_SHIM = """#!/bin/sh
# ssh for simulated hosts: skip ssh's options (before and after the host, as ssh does), run the command in
# the host's namespace through the agent.
host=""
while [ $# -gt 0 ]; do
    case "$1" in
        -[oplicFEJLRDWw]) shift 2 ;;
        -*) shift ;;
        *) if [ -n "$host" ]; then break; fi; host="$1"; shift ;;
    esac
done
exec "{agent}" "$host" "$@"
"""

AGENT = """#!/bin/sh
# rsh agent for simulated hosts: $1 is a host's address, the rest the command to run there.
host="$1"; shift
case "$host" in
{cases}
    *) echo "simulated hosts: unknown host $host" >&2; exit 255 ;;
esac
ip netns list | grep -q "^$ns\\b" || {{ echo "simulated hosts: host $host is gone" >&2; exit 255; }}
if [ -n "$disk" ]; then
    exec ip netns exec "$ns" sh -c 'mkdir -p "$0" && mount -t tmpfs local-disk "$0" && exec sh -c "$*"' "$disk" "$*"
fi
exec ip netns exec "$ns" sh -c "$*"
"""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _remove_namespace(namespace: str) -> None:
    """Kill every process in `namespace`, then delete it."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def _free_subnet() -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for third in range(77, 250):
        net = ipaddress.ip_network(f"10.{third}.{os.getpid() % 200 + 1}.0/24")
        if str(net.network_address)[:-1] not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet")


@dataclass
class Hosts:
    """Addresses of the simulated hosts, the agent and shim that reach them, and the private disk folder."""

    addresses: list[str]
    namespaces: list[str]
    subnet: str
    agent: Path
    bin: Path
    disk: Path | None

    def env(self) -> dict[str, str]:
        """Variables that make mpirun and horovodrun reach these hosts (the shim's folder first on PATH)."""
        return {
            "OMPI_MCA_plm_rsh_agent": str(self.agent),
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "OMPI_MCA_btl_tcp_if_include": self.subnet,
            "OMPI_MCA_oob_tcp_if_include": self.subnet,
            "OMPI_MCA_plm_rsh_no_tree_spawn": "1",
        }

    def host_list(self, slots: int = 1) -> str:
        return ",".join(f"{address}:{slots}" for address in self.addresses)

    def on(self, index: int, argv: list[str], local_disk: bool = False) -> list[str]:
        """`argv` run on host `index` (with its private disk mounted on `disk` when asked)."""
        command = ["ip", "netns", "exec", self.namespaces[index]]
        if local_disk and self.disk is not None:
            mount = 'mkdir -p "$0" && mount -t tmpfs local-disk "$0" && shift && exec "$@"'
            return [*command, "sh", "-c", mount, str(self.disk), "--", *argv]
        return [*command, *argv]

    def rank_process(self, index: int, rank: int) -> psutil.Process | None:
        """The training process of `rank` on host `index` (remote daemons are not the launcher's descendants)."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.namespaces[index]], capture_output=True, text=True
        ).stdout.split()
        candidates = []
        for pid in pids:
            try:
                candidates.append(psutil.Process(int(pid)))
            except psutil.NoSuchProcess:
                continue
        return training_process_of(candidates, rank)

    def lose(self, index: int) -> None:
        """The host dies: every process in it is killed and the host disappears from the network."""
        _remove_namespace(self.namespaces[index])


def namespaces_available() -> str | None:
    """Why simulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "simulated hosts need iproute2 and unshare"
    probe = f"pfcprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def require_namespaces() -> None:
    """Skip with the reason when namespaces cannot be made, unless PARTIAL_FC_REQUIRE_ALL says CI must have them."""
    reason = namespaces_available()
    if reason is None:
        return
    if os.environ.get("PARTIAL_FC_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason}, and this run requires multi-host tests")
    pytest.skip(reason)


@contextmanager
def simulated_hosts(count: int, workdir: Path, disk: Path | None = None) -> Iterator[Hosts]:
    """`count` hosts on a fresh bridge; with `disk`, each host's commands see a private tmpfs at that path."""
    require_namespaces()
    net = _free_subnet()
    tag = f"pfc{os.getpid() % 10000}{int(time.time()) % 100:02d}"
    bridge, namespaces = f"{tag}br", [f"{tag}h{i + 1}" for i in range(count)]
    addresses = [str(net.network_address + i + 1) for i in range(count)]
    try:
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{net.network_address + 254}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for index, (namespace, address) in enumerate(zip(namespaces, addresses)):
            veth = f"{tag}v{index + 1}"
            _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _run("ip", "link", "set", veth, "master", bridge, "up")
            _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _run("ip", "-n", namespace, "link", "set", "eth0", "up")
            _run("ip", "-n", namespace, "link", "set", "lo", "up")
        tools = workdir / "simulated_hosts"
        (tools / "bin").mkdir(parents=True, exist_ok=True)
        cases = "\n".join(
            f"    {address}) ns={namespace} disk={disk or ''} ;;" for address, namespace in zip(addresses, namespaces)
        )
        agent = tools / "agent"
        agent.write_text(AGENT.format(cases=cases))
        (tools / "bin" / "ssh").write_text(SSH_SHIM.format(agent=agent))
        for script in (agent, tools / "bin" / "ssh"):
            script.chmod(0o755)
        yield Hosts(addresses, namespaces, str(net), agent, tools / "bin", disk)
    finally:
        for namespace in namespaces:
            _remove_namespace(namespace)
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True)
