"""Warm restart over real HTTP and ZMQ: ``--warm-from`` a peer, ``--snapshot-file`` across a
restart, refused and corrupt files, and replay of the gap after a restore."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from kvindex_service import Indexer
from kvindex_service.snapshot import write_file
from tests.api.helpers import LiveServer, Publisher, make_settings, wait_for
from tests.api.test_cli import ROOT, _env
from tests.conftest import load_vllm_capture
from tests.events.helpers import Router

CAPTURE = load_vllm_capture("0.33.0")
MODEL = CAPTURE["model"]
FINAL = CAPTURE["messages"][-1]["expect_after"]
TOKEN = "snap-token"


def _scores(c: httpx.Client) -> list[Any]:
    out = []
    for ids in CAPTURE["prompts"].values():
        r = c.post("/score", json={"model": MODEL, "token_ids": ids, "pods": sorted(FINAL)})
        assert r.status_code == 200, r.text
        out.append(r.json()["scores"])
    return out


def _matched(scores: list[Any]) -> dict[str, dict[str, int]]:
    got: dict[str, dict[str, int]] = {pod: {} for pod in FINAL}
    for prompt, per_prompt in zip(CAPTURE["prompts"], scores, strict=True):
        for s in per_prompt:
            got[s["pod"]][prompt] = s["matched_blocks"]
    return got


def _feed(server: LiveServer, c: httpx.Client) -> list[Any]:
    """Publish the capture into ``server`` (one publisher per pod); its final scores."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pubs: dict[str, Publisher] = {}
    try:
        for msg in CAPTURE["messages"]:
            pub = pubs.get(msg["pod"]) or pubs.setdefault(msg["pod"], Publisher(ctx, server.zmq_endpoint))
            pub.send(msg["frames"])
        wait_for(lambda: _matched(_scores(c)) == FINAL, what="the capture to be indexed")
    finally:
        for pub in pubs.values():
            pub.close()
        ctx.term()
    return _scores(c)


def _client(server: LiveServer, token: str | None = None) -> httpx.Client:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, timeout=30.0, headers=headers)


def test_a_replica_warmed_from_a_peer_answers_alike_at_ready() -> None:
    a = LiveServer(make_settings(http={"auth_token": TOKEN}))
    a.start()
    try:
        with _client(a, TOKEN) as ca:
            a.wait_ready(ca)
            expected = _feed(a, ca)
            assert httpx.get(f"{a.url}/snapshot").status_code == 401
            b = LiveServer(make_settings(http={"auth_token": TOKEN}, snapshot={"warm_from": a.url}))
            b.start()
            try:
                with _client(b, TOKEN) as cb:
                    b.wait_ready(cb)  # publishers silent from here on
                    assert cb.get("/readyz").json()["snapshot"] == "loaded"
                    assert _scores(cb) == expected
                    pods = {p["pod"]: p for p in cb.get("/pods").json()["pods"]}
                    assert {pod: pods[pod]["last_seq"] for pod in FINAL} == {
                        p["pod"]: p["last_seq"] for p in ca.get("/pods").json()["pods"] if p["pod"] in FINAL
                    }
            finally:
                b.stop()
    finally:
        a.stop()


def test_a_restart_with_a_snapshot_file_answers_alike_at_ready(tmp_path: Path) -> None:
    path = tmp_path / "kvindex.snapshot"
    a = LiveServer(make_settings(snapshot={"file": str(path)}))
    a.start()
    with _client(a) as ca:
        a.wait_ready(ca)
        assert ca.get("/readyz").json()["snapshot"] == "cold"  # no file yet
        expected = _feed(a, ca)
    a.stop()  # written at shutdown
    assert path.stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))
    b = LiveServer(make_settings(snapshot={"file": str(path), "interval": 0.2}))
    b.start()
    try:
        with _client(b) as cb:
            b.wait_ready(cb)
            assert _scores(cb) == expected
            # written again periodically, atomically
            before = path.stat().st_mtime_ns
            wait_for(lambda: path.stat().st_mtime_ns != before, what="a periodic write")
    finally:
        b.stop()


def test_a_corrupt_file_is_rejected_and_the_service_starts_cold(tmp_path: Path) -> None:
    path = tmp_path / "kvindex.snapshot"
    ix = Indexer(hash_seed="42", shards=2)
    ix.add_blocks("10.0.0.9:8000", MODEL, [1, 2, 3])
    write_file(ix, str(path))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    server = LiveServer(make_settings(snapshot={"file": str(path)}))
    server.start()
    try:
        with _client(server) as c:
            server.wait_ready(c)
            assert c.get("/readyz").json()["snapshot"] == "cold"
            assert c.get("/pods").json()["pods"] == []
    finally:
        server.stop()


def test_a_file_of_another_block_size_stops_serve_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "kvindex.snapshot"
    write_file(Indexer(hash_seed="42", block_size=16, shards=1), str(path))
    r = subprocess.run(
        [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0",
         "--zmq-bind", "tcp://127.0.0.1:*", "--hash-seed", "42", "--block-size", "32",
         "--snapshot-file", str(path)],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "block_size=16" in last and "block_size=32" in last and "Traceback" not in r.stderr


def test_a_gap_after_restore_is_replayed_from_the_restored_seq(tmp_path: Path) -> None:
    pod = "10.0.0.7:8000"
    path = tmp_path / "kvindex.snapshot"
    msg = CAPTURE["messages"][0]
    ix = Indexer(hash_seed="42", shards=2)
    ix.apply(pod, MODEL, msg["frames"][2], seq=41)
    write_file(ix, str(path))
    router = Router(lambda start: [])
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    zmq_cfg = {"bind": None, "pods": [{"endpoint": endpoint, "pod_id": pod, "replay_endpoint": router.endpoint}]}
    server = LiveServer(make_settings(zmq=zmq_cfg, snapshot={"file": str(path)}))
    server.start()
    try:
        with _client(server) as c:
            server.wait_ready(c)
            assert pub.poll(10_000, zmq.POLLIN)
            pub.recv()  # the subscription
            topic = f"kv@{pod}@{MODEL}".encode()
            pub.send_multipart([topic, (44).to_bytes(8, "big"), msg["frames"][2]])
            assert router.received.wait(10), "no replay request"
            assert router.requests[0][1] == (42).to_bytes(8, "big")  # right after the restored 41
    finally:
        server.stop()
        pub.close(linger=0)
        ctx.term()
        router.close()


@pytest.mark.parametrize("path", ["/snapshot"])
def test_the_snapshot_route_streams_octets(path: str) -> None:
    server = LiveServer(make_settings())
    server.start()
    try:
        with _client(server) as c:
            server.wait_ready(c)
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
            Indexer(hash_seed="42").load_snapshot(r.content)
    finally:
        server.stop()
