"""``POST /pods`` under load and abuse, against the real server (uvicorn, lifespan, sockets):
hundreds of subscriptions never answer 5xx and shutdown stays prompt; ``zmq.max_pods`` answers
429; endpoints are validated, resolved and held to ``zmq.connect_allow``."""

from __future__ import annotations

import time

import httpx

from tests.api.helpers import LiveServer, make_settings

N = 400


def test_400_subscriptions_no_5xx_and_prompt_shutdown() -> None:
    server = LiveServer(make_settings(zmq={"max_pods": N}))
    server.start()
    stopped = False
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            statuses = [
                client.post("/pods", json={"endpoint": f"tcp://127.0.0.1:{20000 + i}"}).status_code
                for i in range(N + 10)
            ]
            assert not [s for s in statuses if s >= 500]
            assert statuses.count(201) == N and statuses.count(429) == 10
            assert client.get("/pods").json()["count"] == N
            body = client.post("/pods", json={"endpoint": "tcp://127.0.0.1:1"}).json()
            assert body["error"]["type"] == "pod_limit"
        t0 = time.monotonic()
        server.stop()
        stopped = True
        assert time.monotonic() - t0 < 10
        assert not server._thread.is_alive()
    finally:
        if not stopped:
            server.stop()


def test_endpoint_checks_and_connect_allow() -> None:
    server = LiveServer(make_settings(zmq={"bind": "none", "connect_allow": ["10.0.0.0/8"]}))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def post(**body: object) -> httpx.Response:
                return client.post("/pods", json=body)

            r = post(endpoint="tcp://no-such-host.invalid:5557")
            assert r.status_code == 400 and "resolve" in r.json()["error"]["message"]
            assert post(endpoint="tcp://10.0.0.1:70000").status_code == 400
            assert post(endpoint="udp://10.0.0.1:5557").status_code == 400
            r = post(endpoint="tcp://127.0.0.1:5557")
            assert r.status_code == 403 and "connect_allow" in r.json()["error"]["message"]
            assert post(endpoint="ipc:///tmp/kvindex-test.ipc").status_code == 403
            assert post(endpoint="tcp://10.0.0.1:5557", replay_endpoint="tcp://127.0.0.1:5558").status_code == 403
            assert post(endpoint="tcp://10.0.0.1:5557", pod_id="p" * 300).status_code == 422
            r = post(endpoint="tcp://10.0.0.1:5557", pod_id="10.0.0.1:8000")
            assert r.status_code == 201 and r.json()["endpoint"] == "tcp://10.0.0.1:5557"
            metrics = client.get("/metrics").text
            assert 'kvindex_events_rejected_total{reason="peer_mismatch"} 0.0' in metrics
    finally:
        server.stop()


def test_hostnames_resolve_when_any_destination_is_allowed() -> None:
    server = LiveServer(make_settings(zmq={"bind": "none"}))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/pods", json={"endpoint": "tcp://localhost:5999"})
            assert r.status_code == 201 and r.json()["endpoint"] == "tcp://localhost:5999"
            r = client.post("/pods", json={"endpoint": "tcp://no-such-host.invalid:5557"})
            assert r.status_code == 400
    finally:
        server.stop()
