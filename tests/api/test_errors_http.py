"""Bad input over real HTTP: always a 4xx with ``{"error": {"type", "message"}}``, never a
500, and the server keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.helpers import MODEL, LiveServer, make_settings

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_server() -> Iterator[LiveServer]:
    """A server with a small body limit and tokenizers left unconfigured except Llama 3.2."""
    server = LiveServer(make_settings(http={"max_body_bytes": LIMIT}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(small_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=small_server.url, timeout=30.0) as c:
        small_server.wait_ready(c)
        yield c


def _error(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert body["error"]["type"] == type_
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text
    return body["error"]


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "m", "token_ids": [1, 2', b"not json", b"\xff\xfe\x00", b'{"model": "m",}', b"[1, 2"],
)
def test_malformed_json_is_400(api: httpx.Client, raw: bytes) -> None:
    err = _error(api.post("/score", content=raw, headers={"content-type": "application/json"}), 400, "malformed_json")
    assert "JSON" in err["message"]


def test_empty_body_is_400(api: httpx.Client) -> None:
    _error(api.post("/score", content=b""), 400, "malformed_json")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"token_ids": [1, 2, 3]}, "model"),
        ({"model": "", "token_ids": [1]}, "model"),
        ({"model": MODEL}, "exactly one of token_ids, prompt, messages"),
        ({"model": MODEL, "token_ids": [1], "prompt": "hi"}, "got: token_ids, prompt"),
        ({"model": MODEL, "prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"model": MODEL, "token_ids": [1, "2"]}, "token_ids.1"),
        ({"model": MODEL, "token_ids": [1, 2.5]}, "token_ids.1"),
        ({"model": MODEL, "token_ids": [True]}, "token_ids.0"),
        ({"model": MODEL, "token_ids": "1 2 3"}, "token_ids"),
        ({"model": MODEL, "prompt": []}, "prompt"),
        ({"model": MODEL, "messages": [{"content": "no role"}]}, "role"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "token_ids": [1], "pods": "10.0.0.1:8000"}, "pods"),
        (["model", MODEL], "object"),
    ],
)
def test_invalid_requests_are_422(api: httpx.Client, body: Any, needle: str) -> None:
    err = _error(api.post("/score", json=body), 422, "validation_error")
    assert needle in err["message"] or needle in str(err.get("details")), err


@pytest.mark.parametrize("token", [-1, 2**32, 2**63, 2**70, -(2**70)])
def test_token_ids_out_of_range_are_400(api: httpx.Client, token: int) -> None:
    err = _error(api.post("/score", json={"model": MODEL, "token_ids": [1, token]}), 400, "invalid_input")
    assert str(token) in err["message"] and "token_ids[1]" in err["message"]


def test_model_without_tokenizer_is_404(api: httpx.Client) -> None:
    for body in (
        {"model": "acme/no-such-model", "prompt": "hello"},
        {"model": "acme/no-such-model", "messages": [{"role": "user", "content": "hello"}]},
    ):
        err = _error(api.post("/score", json=body), 404, "unknown_model")
        assert "no tokenizer for model 'acme/no-such-model'" in err["message"]
    # Token ids need no tokenizer: an unknown model simply matches nothing.
    ok = api.post("/score", json={"model": "acme/no-such-model", "token_ids": list(range(40))})
    assert ok.status_code == 200 and ok.json()["scores"] == []


def test_body_over_limit_is_413(api: httpx.Client) -> None:
    big = {"model": MODEL, "token_ids": list(range(LIMIT // 4))}
    err = _error(api.post("/score", json=big), 413, "body_too_large")
    assert str(LIMIT) in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: a chunked, streamed body
        yield b'{"model": "m", "token_ids": ['
        for _ in range(LIMIT // 1000 + 2):
            yield b"1," * 500
        yield b"1]}"

    _error(api.post("/score", content=chunks()), 413, "body_too_large")
    # Just under the limit is fine.
    fits = {"model": MODEL, "token_ids": [1] * (LIMIT // 3 - 100)}
    assert api.post("/score", json=fits).status_code == 200


def test_unknown_pod_is_404(api: httpx.Client) -> None:
    for r in (api.get("/pods/10.9.9.9:8000"), api.delete("/pods/10.9.9.9:8000"), api.get("/pods/tcp://1.2.3.4:5")):
        err = _error(r, 404, "pod_not_found")
        assert "unknown pod" in err["message"]


@pytest.mark.parametrize(
    "endpoint",
    ["localhost:5557", "tcp://", "tcp://host", "tcp://host:99999", "inproc://x", "tcp://*:5557", "udp://h:1"],
)
def test_bad_endpoint_on_post_pods_is_400(api: httpx.Client, endpoint: str) -> None:
    err = _error(api.post("/pods", json={"endpoint": endpoint}), 400, "bad_endpoint")
    assert endpoint in err["message"]


def test_post_pods_validation(api: httpx.Client) -> None:
    _error(api.post("/pods", json={}), 422, "validation_error")
    _error(api.post("/pods", json={"endpoint": "tcp://127.0.0.1:1", "bogus": 1}), 422, "validation_error")
    _error(api.post("/pods", json={"endpoint": "tcp://127.0.0.1:9", "replay_endpoint": "nope"}), 400, "bad_endpoint")


def test_routing_errors(api: httpx.Client) -> None:
    _error(api.get("/no/such/route"), 404, "not_found")
    _error(api.get("/score"), 405, "method_not_allowed")


def test_compat_routes_reject_bad_input(api: httpx.Client) -> None:
    _error(api.post("/score_completions", json={"model": MODEL}), 422, "validation_error")
    _error(api.post("/score_chat_completions", json={"model": MODEL}), 422, "validation_error")
    _error(api.post("/query", json={"model": MODEL, "token_ids": [-5]}), 400, "invalid_input")
    _error(api.post("/query_by_hash", json={"model": MODEL, "seq_hashes": ["zz"]}), 422, "validation_error")
    _error(api.post("/query_by_hash", json={"model": MODEL}), 422, "validation_error")
    _error(api.post("/query_by_hash", json={"model": MODEL, "seq_hashes": [-1]}), 422, "validation_error")


def test_error_responses_are_counted_and_the_server_still_serves(api: httpx.Client) -> None:
    api.post("/score", content=b"{")
    api.post("/score", json={"model": MODEL})
    api.get("/no/such/route")
    metrics = api.get("/metrics").text
    assert 'kvindex_http_requests_total{method="POST",route="/score",status="400"}' in metrics
    assert 'kvindex_http_requests_total{method="POST",route="/score",status="422"}' in metrics
    assert 'route="<unmatched>"' in metrics  # the 404 above, without its raw path
    assert "/no/such/route" not in metrics
    ok = api.post("/score", json={"model": MODEL, "token_ids": [1, 2, 3]})
    assert ok.status_code == 200
