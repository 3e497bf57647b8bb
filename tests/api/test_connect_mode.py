"""Connect mode from configuration: the service connects to a pod's publisher (vLLM's
default ``tcp://*:5557`` bind), names the pod as configured, and scores what it published."""

from __future__ import annotations

import httpx
import zmq

from tests.api.helpers import MODEL, LiveServer, make_settings, wait_for
from tests.conftest import load_vllm_capture


def test_configured_pod_is_subscribed_and_scored() -> None:
    capture = load_vllm_capture("0.26.0")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.XPUB)  # vLLM binds; kvindex connects
    pub.bind("tcp://127.0.0.1:*")
    endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    server = LiveServer(make_settings(zmq={"bind": None, "pods": [{"endpoint": endpoint, "pod_id": "10.3.0.1:8000"}]}))
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            server.wait_ready(client)
            assert pub.poll(10_000, zmq.POLLIN), "the service never subscribed"
            pub.recv()
            state = client.get("/pods/10.3.0.1:8000").json()
            assert state["mode"] == "connect" and state["endpoint"] == endpoint
            # Only the first pod's messages: this publisher is that pod.
            mine = [m for m in capture["messages"] if m["pod"] == "10.0.0.1:8000"]
            for msg in mine:
                pub.send_multipart(msg["frames"])
            last = int.from_bytes(mine[-1]["frames"][1], "big")
            wait_for(lambda: client.get("/pods/10.3.0.1:8000").json()["last_seq"] == last, what="batches applied")
            expect = mine[-1]["expect_after"]["10.0.0.1:8000"]
            for name, ids in capture["prompts"].items():
                body = client.post("/score", json={"model": MODEL, "token_ids": ids, "pods": ["10.3.0.1:8000"]}).json()
                assert body["scores"][0]["matched_blocks"] == expect[name], name
    finally:
        server.stop()
        pub.close(linger=0)
        ctx.term()
