"""The shared index going away and coming back, with a real redis-server stopped and
restarted on the same port: ``/score`` degrades (from the ingesting replica's own copy, or
empty on a replica without one) and says so, ``/readyz`` reports the backend, batches wait in
a bounded buffer (the rest counted as dropped), and the writer reconnects with backoff."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq

from kvindex_service._native import Indexer
from tests.api.helpers import LiveServer, Publisher, make_settings, wait_for
from tests.redis.conftest import RedisServer, start_redis

MODEL = "m"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, so stopping it disturbs no other test."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


def _batch(hashes: list[int], toks: list[int]) -> bytes:
    return bytes(msgpack.packb([1.0, [["BlockStored", hashes, None, toks, 16, None, "GPU"]], 0]))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}")


def test_down_degrades_buffers_and_recovers(own_redis: RedisServer, tmp_path: Path) -> None:
    toks = [random.Random(1).randrange(1, 1000) for _ in range(64)]
    keys = Indexer(hash_seed="42", shards=1).block_keys(toks)
    backend = {"backend": own_redis.url, "backend_buffer": 3, "backend_timeout": 0.2}
    a = LiveServer(make_settings(index=backend))
    b = LiveServer(make_settings(index=backend, zmq={"bind": None}))
    a.start()
    b.start()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        with httpx.Client(base_url=a.url, timeout=10.0) as ca, httpx.Client(base_url=b.url, timeout=10.0) as cb:
            a.wait_ready(ca)
            b.wait_ready(cb)
            pub = Publisher(ctx, a.zmq_endpoint)
            topic = f"kv@pod-1@{MODEL}".encode()
            pub.send([topic, (0).to_bytes(8, "big"), _batch(keys[:2], toks[:32])])
            body = {"model": MODEL, "token_ids": toks}
            wait_for(lambda: cb.post("/score", json=body).json()["best_pod"] == "pod-1", what="B sees pod-1")

            own_redis.stop()
            ra, rb = ca.post("/score", json=body).json(), cb.post("/score", json=body).json()
            # A answers from its own copy, B has none: both say so
            assert ra["degraded"] and ra["scores"][0]["matched_blocks"] == 2
            assert rb["degraded"] and rb["scores"] == [] and rb["total_blocks"] == 4
            # candidates are still listed, with zeros
            rc = cb.post("/score", json={**body, "pods": ["pod-1"]}).json()
            assert rc["scores"][0]["pod"] == "pod-1" and rc["scores"][0]["matched_blocks"] == 0
            r = cb.get("/readyz")
            assert r.status_code == 503 and r.json()["backend"] == "down"
            assert any("index backend unreachable" in x for x in r.json()["reasons"])
            # batches while down: the first 3 wait, the rest are dropped and counted
            for seq in range(1, 7):
                pub.send([topic, seq.to_bytes(8, "big"), _batch(keys[2:4], toks[32:64])])

            def dropped() -> str | None:
                text = ca.get("/metrics").text
                return text if _metric(text, 'kvindex_backend_batches_total{outcome="dropped"}') >= 3 else None

            m = wait_for(dropped, what="dropped batches counted")
            assert _metric(m, "kvindex_backend_up") == 0
            assert _metric(m, "kvindex_backend_buffered_batches") == 3
            assert _metric(m, 'kvindex_backend_scores_total{outcome="degraded"}') >= 1

            back = start_redis(own_redis.workdir, own_redis.port)  # empty: no persistence
            try:
                wait_for(lambda: ca.get("/readyz").status_code == 200, what="A ready again")
                # the buffered batches reached the new server; the reconnect is counted
                wait_for(lambda: cb.post("/score", json=body).json()["scores"], what="B sees the replayed batches")
                m = ca.get("/metrics").text
                assert _metric(m, "kvindex_backend_reconnects_total") >= 1
                assert _metric(m, "kvindex_backend_buffered_batches") == 0
                rb = cb.post("/score", json=body).json()
                assert not rb["degraded"]
            finally:
                back.stop()
            pub.close()
    finally:
        a.stop()
        b.stop()
        ctx.term()


def test_a_bad_backend_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    for bad in ("mysql://x", "redis://h:99999/0", "redis://h/abc", "redis+cluster://h/3"):
        r = subprocess.run(
            [sys.executable, "-m", "kvindex_service", "serve", "--index-backend", bad],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "index.backend" in r.stderr
        assert "Traceback" not in r.stderr


def test_an_unreachable_backend_at_start_is_not_fatal() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    srv = LiveServer(make_settings(index={"backend": f"redis://127.0.0.1:{port}/0", "backend_timeout": 0.1}))
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10.0) as c:
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["backend"] == "down"
            s = c.post("/score", json={"model": MODEL, "token_ids": list(range(40))}).json()
            assert s["degraded"] and s["scores"] == []
    finally:
        srv.stop()
