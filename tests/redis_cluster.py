"""Real Redis topologies on loopback for tests: a three-master Cluster, and one master with one
replica watched by one Sentinel. No persistence; every process is stopped by its own PID."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.redis_server import START_TIMEOUT_S, RedisServer, free_port, ping

SETUP_TIMEOUT_S = 30.0
SERVICE = "mymaster"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (make test installs redis-server)")
    return path


def spawn(workdir: Path, port: int, *args: str, name: str = "redis") -> RedisServer:
    """redis-server with `args` on `port`, up when it answers PING."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary("redis-server"), *args, "--port", str(port), "--bind", "127.0.0.1",
         "--dir", str(workdir), "--logfile", str(workdir / "redis.log"), "--daemonize", "no",
         *([] if "--sentinel" in args else ["--save", "", "--appendonly", "no"])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = RedisServer(proc, port, workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if ping(port):
            return server
        time.sleep(0.01)
    log = server.log()
    server.stop()
    raise RuntimeError(f"{name} on {port} did not start:\n{log[-2000:]}")


def cli(port: int, *args: str, timeout_s: float = 5.0) -> str:
    """One redis-cli command against 127.0.0.1:`port`; its output."""
    done = subprocess.run([binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout_s, check=True)
    return done.stdout


def info(port: int, section: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in cli(port, "INFO", section).splitlines()
             if ":" in line)
    return {k: v.strip() for k, v in pairs}


def wait_until(what: str, check: Callable[[], bool], timeout_s: float = SETUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
            if check():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Topology:
    servers: list[RedisServer] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.port}\n{s.log()[-1500:]}" for s in self.servers)


@dataclass
class Cluster(Topology):
    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)


def start_cluster(workdir: Path, masters: int = 3) -> Cluster:
    """`masters` cluster-enabled servers joined by `redis-cli --cluster create`, all slots
    covered and `cluster_state:ok` on every node."""
    cluster = Cluster()
    try:
        for n in range(masters):
            port = free_port()
            # An explicit bus port: the default (port + 10000) may be taken or past 65535.
            cluster.servers.append(spawn(
                workdir / f"node{n}", port, "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / f"node{n}" / "nodes.conf"),
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000"))
        subprocess.run(
            [binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{s.port}" for s in cluster.servers),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=SETUP_TIMEOUT_S, check=True)
        for server in cluster.servers:
            wait_until("cluster_state:ok",
                       lambda port=server.port: "cluster_state:ok" in cli(port, "CLUSTER", "INFO"))
        return cluster
    except BaseException:
        cluster.stop()
        raise


@dataclass
class SentinelSetup(Topology):
    """servers[0]: the first master, servers[1]: its replica, servers[2]: the sentinel."""

    @property
    def sentinel_port(self) -> int:
        return self.servers[2].port

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"

    def master_port(self) -> int:
        addr = cli(self.sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()
        return int(addr[1])

    def replica_synced(self, master: int, replica: int) -> bool:
        """The replica is linked and has everything the master wrote so far."""
        theirs = info(replica, "replication")
        ours = info(master, "replication")
        return (theirs.get("master_link_status") == "up"
                and int(theirs["slave_repl_offset"]) >= int(ours["master_repl_offset"]))

    def failover(self) -> int:
        """SENTINEL FAILOVER once the replica has synced; the new master's port once the
        sentinel names it and it acts as master."""
        old = self.master_port()
        replica = next(s.port for s in self.servers[:2] if s.port != old)
        wait_until("the replica to sync", lambda: self.replica_synced(old, replica))
        cli(self.sentinel_port, "SENTINEL", "FAILOVER", SERVICE)
        wait_until("the new master", lambda: self.master_port() == replica
                   and info(replica, "replication").get("role") == "master")
        return replica


def start_sentinel(workdir: Path) -> SentinelSetup:
    setup = SentinelSetup()
    try:
        # No 5 s wait before the replica's first (diskless) sync.
        master = spawn(workdir / "master", free_port(), "--repl-diskless-sync-delay", "0")
        setup.servers.append(master)
        setup.servers.append(spawn(workdir / "replica", free_port(), "--replicaof", "127.0.0.1",
                                   str(master.port)))
        sentinel_dir = workdir / "sentinel"
        sentinel_dir.mkdir(parents=True, exist_ok=True)
        conf = sentinel_dir / "sentinel.conf"  # the sentinel rewrites it: its own file
        conf.write_text(
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n")
        setup.servers.append(spawn(sentinel_dir, free_port(), str(conf), "--sentinel",
                                   name="sentinel"))
        replica = setup.servers[1].port
        wait_until("the replica to link", lambda: info(replica, "replication").get(
            "master_link_status") == "up")
        wait_until("the sentinel to see the replica", lambda: f"{replica}" in cli(
            setup.sentinel_port, "SENTINEL", "REPLICAS", SERVICE))

        def replica_known() -> bool:  # its INFO read: a replica SENTINEL FAILOVER may pick
            fields = cli(setup.sentinel_port, "SENTINEL", "REPLICAS", SERVICE).split()
            return dict(zip(fields[::2], fields[1::2], strict=False)).get(
                "master-link-status") == "ok"

        wait_until("the sentinel to read the replica's state", replica_known)
        return setup
    except BaseException:
        setup.stop()
        raise

