"""A real redis-server (Debian's /usr/bin/redis-server) for the shared-index tests.

One server per session on a free loopback port with its own temporary directory (never
6379); every test gets an empty database. Without the binary the tests skip, unless
``KVINDEX_REQUIRE_REDIS=1`` (CI, ``make test-redis``), where that fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tests.conftest import terminate


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def stop(self) -> None:
        terminate(self.proc, 10)


def redis_binary() -> str:
    found = os.environ.get("KVINDEX_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(found).exists():
        reason = "no redis-server (apt-get install redis-server)"
        if os.environ.get("KVINDEX_REQUIRE_REDIS"):
            pytest.fail(reason + " (KVINDEX_REQUIRE_REDIS is set)", pytrace=False)
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path, port: int | None = None, *extra: str) -> RedisServer:
    """Start redis-server and wait until it answers PING (a port taken meanwhile: retried)."""
    binary = redis_binary()
    for _ in range(5):
        p = port or _free_port()
        args = [binary, "--port", str(p), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", *extra]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(p, proc, workdir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if server.client().ping():
                    return server
            except redis.ConnectionError:
                time.sleep(0.02)
        server.stop()
        if port is not None:
            break
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory(prefix="kvindex-redis-") as d:
        server = start_redis(Path(d))
        yield server
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty database on the session's server."""
    c = redis_server.client()
    c.flushall()
    c.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster_server() -> Iterator[RedisServer]:
    """A one-node Redis cluster owning every slot: the cluster protocol (MOVED-aware client,
    slot checks on scripts) on one process."""
    with tempfile.TemporaryDirectory(prefix="kvindex-redis-cluster-") as d:
        server = start_redis(Path(d), None, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        c = server.client()
        c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never became ok"
            time.sleep(0.05)
        c.close()
        yield server
        server.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster_server: RedisServer) -> str:
    c = redis_cluster_server.client()
    c.flushall()
    c.close()
    return f"redis+cluster://127.0.0.1:{redis_cluster_server.port}"
