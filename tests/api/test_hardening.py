"""Hardening of the HTTP surface, against a real server: bearer-token auth, control
characters in logs, tokenizer size limits, unknown fields, and large bodies kept off the
event loop (checked by ordering, not timing)."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import httpx
import pytest

import kvindex_service.api.body as body_module
from kvindex_service.log import TextFormatter, configure_logging, escape_control
from tests.api.helpers import MODEL, LiveServer, make_settings

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def authed() -> Iterator[LiveServer]:
    srv = LiveServer(make_settings(http={"auth_token": TOKEN}, zmq={"bind": "none"}))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def limited() -> Iterator[LiveServer]:
    srv = LiveServer(make_settings(zmq={"bind": "none"}, tokenizers={"max_messages": 50, "max_prompt_chars": 5000}))
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            srv.wait_ready(c)
        yield srv
    finally:
        srv.stop()


# -- authentication -------------------------------------------------------------------------
PROTECTED = [
    ("POST", "/score", {"model": MODEL, "token_ids": list(range(40))}),
    ("POST", "/query", {"model": MODEL, "token_ids": list(range(40))}),
    ("POST", "/score_completions", {"model": MODEL, "prompt": "hello"}),
    ("GET", "/metrics", None),
    ("GET", "/pods", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED, ids=[p for _, p, _ in PROTECTED])
def test_protected_routes_need_the_bearer_token(authed: LiveServer, method: str, path: str, body: object) -> None:
    with httpx.Client(base_url=authed.url, timeout=60) as c:
        authed.wait_ready(c)
        missing = c.request(method, path, json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["error"]["type"] == "unauthorized"
        assert "Authorization: Bearer" in missing.json()["error"]["message"]
        wrong = c.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
        basic = c.request(method, path, json=body, headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401 and basic.json()["error"]["details"]["reason"] == "invalid_request"
        ok = c.request(method, path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200, ok.text


def test_probes_stay_open_and_post_pods_needs_the_token(authed: LiveServer) -> None:
    with httpx.Client(base_url=authed.url, timeout=60) as c:
        authed.wait_ready(c)
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        r = c.post("/pods", json={"endpoint": "tcp://127.0.0.1:1", "pod_id": "10.0.0.1:8000"})
        assert r.status_code == 401
        assert authed.runtime.indexer is not None and authed.runtime.indexer.pod_state("10.0.0.1:8000") is None
        spec = c.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
        assert "401" in spec["paths"]["/score"]["post"]["responses"]
        assert "401" not in spec["paths"]["/healthz"]["get"]["responses"]


# -- log injection --------------------------------------------------------------------------
def test_escape_control_covers_c0_c1_and_line_separators() -> None:
    assert escape_control("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_control("\x1b[31mred\x00\x7f\x85\u2028") == "\\x1b[31mred\\x00\\x7f\\x85\\u2028"
    assert escape_control("plain é ü 中") == "plain é ü 中"
    record = logging.LogRecord("n", logging.INFO, "f", 1, "msg\n%s", ("x\ny",), None)
    record.path = "/a\nb"
    try:
        raise ValueError("boom\nFAKE LINE")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("msg\\nx\\ny path=/a\\nb")
    assert all(line.startswith("    ") for line in lines[1:]) and any("boom\\nFAKE LINE" in x for x in lines)


def test_a_newline_in_a_request_path_cannot_forge_a_log_line(authed: LiveServer) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    configure_logging("INFO", json_lines=False, stream=stream)
    try:
        forged = "2099-01-01T00:00:00.000Z INFO kvindex_service.access: GET /admin 200"
        with httpx.Client(base_url=authed.url, timeout=60) as c:
            r = c.get("/nothing%0A" + forged.replace(" ", "%20") + "%0D%1B[2J")
            assert r.status_code == 401  # no token: still logged
            for handler in root.handlers:
                handler.flush()
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    text = stream.getvalue()
    lines = [line for line in text.splitlines() if "kvindex_service.access: GET /nothing" in line]
    assert len(lines) == 1, text
    assert "/nothing\\n2099-01-01T00:00:00.000Z" in lines[0] and "\\r\\x1b[2J" in lines[0]
    assert not any(line.startswith("2099") for line in text.splitlines())


# -- limits and unknown fields --------------------------------------------------------------
def _chat(n: int, words: int = 3) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(["word"] * words)} for i in range(n)]


def test_tokenizer_limits_answer_413_naming_the_setting(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        assert c.post("/score", json={"model": MODEL, "messages": _chat(50)}).status_code == 200
        r = c.post("/score", json={"model": MODEL, "messages": _chat(51)})
        assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_large"
        assert "tokenizers.max_messages=50" in r.json()["error"]["message"]
        r = c.post("/score_chat_completions", json={"model": MODEL, "messages": _chat(51)})
        assert r.status_code == 413 and "tokenizers.max_messages" in r.json()["error"]["message"]
        r = c.post("/score", json={"model": MODEL, "prompt": "x" * 5001})
        assert r.status_code == 413 and "tokenizers.max_prompt_chars=5000" in r.json()["error"]["message"]
        assert c.post("/score", json={"model": MODEL, "prompt": "x" * 4000}).status_code == 200
        r = c.post("/score_completions", json={"model": MODEL, "prompt": "y" * 6000})
        assert r.status_code == 413 and "tokenizers.max_prompt_chars" in r.json()["error"]["message"]
        # Under the content limit, over it once the template has wrapped every message.
        r = c.post("/score", json={"model": MODEL, "messages": _chat(40, words=25)})
        assert r.status_code == 413 and "rendered chat characters" in r.json()["error"]["message"]


def test_score_refuses_unknown_fields_compat_routes_ignore_them(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        r = c.post("/score", json={"model": MODEL, "token_ids": [1, 2, 3], "pod": ["10.0.0.1:8000"]})
        assert r.status_code == 422 and "pod" in r.json()["error"]["message"]
        assert c.post("/query", json={"model": MODEL, "token_ids": [1, 2], "extra_field": 1}).status_code == 200
        r = c.post("/score_completions", json={"model": MODEL, "prompt": "hi", "temperature": 0.5})
        assert r.status_code == 200


# -- large bodies off the event loop -------------------------------------------------------
def _big_chat_body() -> bytes:
    body = json.dumps({"model": MODEL, "messages": _chat(40, words=400)}).encode()
    assert len(body) > body_module.INLINE_PARSE_MAX_BYTES
    return body


@pytest.mark.parametrize("stage", ["parse", "render"])
def test_healthz_answers_while_a_large_chat_is_held_in_its_worker(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    """The large request is held inside its parse (or its chat rendering) until /healthz has
    answered. Were that step on the event loop, /healthz could not answer until the gate
    opens on its own, 20 s later, and the order below would be reversed."""
    srv = LiveServer(make_settings(zmq={"bind": "none"}, tokenizers={"max_prompt_chars": 10_000_000}))
    entered, release = threading.Event(), threading.Event()
    healthz_first: list[bool] = []

    def hold() -> None:
        entered.set()
        release.wait(20)
        healthz_first.append(release.is_set())

    if stage == "parse":
        real_validate = body_module._validate

        def gated_validate(model, body):  # type: ignore[no-untyped-def]
            if len(body) > body_module.INLINE_PARSE_MAX_BYTES:
                hold()
            return real_validate(model, body)

        monkeypatch.setattr(body_module, "_validate", gated_validate)
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            srv.wait_ready(c)
            if stage == "render":
                pool = srv.runtime.tokenizers
                assert pool is not None
                real_render = pool.render_chat

                def gated_render(*args, **kwargs):  # type: ignore[no-untyped-def]
                    hold()
                    return real_render(*args, **kwargs)

                monkeypatch.setattr(pool, "render_chat", gated_render)
            result: list[httpx.Response] = []
            big = threading.Thread(
                target=lambda: result.append(
                    httpx.post(
                        srv.url + "/score",
                        content=_big_chat_body(),
                        timeout=60,
                        headers={"content-type": "application/json"},
                    )
                )
            )
            big.start()
            assert entered.wait(30), "the large request never reached its worker"
            try:
                assert c.get("/healthz", timeout=10).status_code == 200
            finally:
                release.set()
            big.join(60)
            assert healthz_first == [True]
            assert result and result[0].status_code == 200, result
            assert result[0].json()["total_tokens"] > 10_000
    finally:
        release.set()
        srv.stop()


def test_docs_are_served_with_local_assets(limited: LiveServer) -> None:
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower()
        js = c.get("/docs-assets/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        assert c.get("/docs-assets/swagger-ui.css").status_code == 200
