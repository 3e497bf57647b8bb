"""TLS on both of the picker's connections, with certificates made for the test run:

* the gRPC server with ``tls_cert``/``tls_key`` (and ``tls_client_ca`` for mTLS), reached by
  the real grpc.aio client over TLS;
* the scorer client speaking HTTPS to a real HTTPS server that checks ``Authorization``.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from pydantic import ValidationError

from kvindex_service.extproc import (
    EnvoyClient,
    ExtprocConfig,
    HttpScorer,
    PromptQuery,
    ScorerError,
    ScorerUnauthorized,
    start_picker,
)
from kvindex_service.extproc.security import ConfigError, scorer_token
from tests.extproc.certs import Certs
from tests.extproc.support import POD1, POD2, PODS, completion_body, run

TOKEN = "s3cret-token"


def _tls(certs: Certs, *, client_cert: bool = False, ca: str = "ca") -> grpc.ChannelCredentials:
    if client_cert:
        return grpc.ssl_channel_credentials(certs.read(ca), certs.read("client_key"), certs.read("client_cert"))
    return grpc.ssl_channel_credentials(certs.read(ca))


def _tls_config(certs: Certs, **extra: Any) -> ExtprocConfig:
    return ExtprocConfig(endpoints=PODS, tls_cert=str(certs.server_cert), tls_key=str(certs.server_key), **extra)


def test_grpc_tls_serves_tls_clients_only(certs: Certs) -> None:
    async def scenario() -> None:
        server = await start_picker(_tls_config(certs))
        target = f"127.0.0.1:{server.port}"
        try:
            async with EnvoyClient(target, credentials=_tls(certs)) as client:
                r = await client.route("/v1/models", b"")
                assert r.endpoint in PODS
            async with EnvoyClient(target) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await plain.route("/v1/models", b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # A client that does not trust the server's CA fails the handshake.
            async with EnvoyClient(target, credentials=_tls(certs, ca="other_ca")) as stranger:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stranger.route("/v1/models", b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert server.stats.opened == 1  # only the TLS client's stream reached the picker
        finally:
            await server.stop()

    run(scenario())


def test_grpc_mtls_requires_a_client_certificate(certs: Certs) -> None:
    async def scenario() -> None:
        server = await start_picker(_tls_config(certs, tls_client_ca=str(certs.ca)))
        target = f"127.0.0.1:{server.port}"
        try:
            async with EnvoyClient(target, credentials=_tls(certs, client_cert=True)) as client:
                r = await client.route("/v1/models", b"")
                assert r.endpoint in PODS
            async with EnvoyClient(target, credentials=_tls(certs)) as anonymous:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await anonymous.route("/v1/models", b"", timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert server.stats.opened == 1
        finally:
            await server.stop()

    run(scenario())


def test_tls_settings_are_checked(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs tls_key"):
        ExtprocConfig(tls_cert=str(certs.server_cert))
    with pytest.raises(ValidationError, match="needs tls_cert"):
        ExtprocConfig(tls_client_ca=str(certs.ca))
    with pytest.raises(ValidationError, match="needs an https:// scorer_url"):
        ExtprocConfig(scorer_url="http://scorer:8080", scorer_ca_file=str(certs.ca))

    async def start(config: ExtprocConfig) -> None:
        server = await start_picker(config)
        await server.stop()

    # The client key does not belong to the server certificate.
    mismatched = ExtprocConfig(tls_cert=str(certs.server_cert), tls_key=str(certs.client_key))
    with pytest.raises(ConfigError, match="unusable"):
        run(start(mismatched))
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM file"):
        run(start(ExtprocConfig(tls_cert=str(not_pem), tls_key=str(certs.server_key))))
    with pytest.raises(ConfigError, match="cannot read it"):
        run(start(ExtprocConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(certs.server_key))))


# -- the scorer over HTTPS ---------------------------------------------------------------------


class _ScorerHandler(BaseHTTPRequestHandler):
    """/score answering POD2 as holding the whole prompt, for the right bearer token only."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append({"path": self.path, "authorization": self.headers.get("authorization"), "body": body})
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"detail": "missing or wrong bearer token"})
            return
        pods = json.loads(body)["pods"]
        scores = [{"pod": POD2, "matched_blocks": 4, "score": 4.0}] if POD2 in pods else []
        self._answer(200, {"scores": scores, "total_blocks": 4})

    def _answer(self, status: int, data: dict[str, Any]) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def https_scorer(certs: Certs) -> Iterator[str]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.server_cert, certs.server_key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ScorerHandler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="https-scorer", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


QUERY = PromptQuery(model="m", prompt="hello")


def test_http_scorer_speaks_https_with_a_bearer_token(https_scorer: str, certs: Certs) -> None:
    async def scenario() -> None:
        ca = ssl.create_default_context(cafile=str(certs.ca))
        good = HttpScorer(https_scorer, timeout_ms=5000, token=TOKEN, verify=ca)
        no_token = HttpScorer(https_scorer, timeout_ms=5000, verify=ca)
        untrusted = HttpScorer(https_scorer, timeout_ms=5000, token=TOKEN)  # system store: no test CA
        try:
            scores = await good.score(QUERY, PODS)
            assert scores.prefix_of(POD2) == 1.0 and scores.prefix_of(POD1) == 0.0
            assert _ScorerHandler.seen[-1]["authorization"] == f"Bearer {TOKEN}"
            with pytest.raises(ScorerUnauthorized):
                await no_token.score(QUERY, PODS)
            assert _ScorerHandler.seen[-1]["authorization"] is None
            n = len(_ScorerHandler.seen)
            with pytest.raises(ScorerError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.score(QUERY, PODS)
            assert len(_ScorerHandler.seen) == n  # the token never left over an untrusted connection
        finally:
            for s in (good, no_token, untrusted):
                await s.close()

    run(scenario())


def test_picker_scores_over_https_with_the_token_file(https_scorer: str, certs: Certs, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = ExtprocConfig(
        endpoints=PODS,
        scorer_url=https_scorer,
        scorer_ca_file=str(certs.ca),
        scorer_token_file=str(token_file),
        timeout_ms=5000,
    )

    async def scenario() -> None:
        server = await start_picker(config)
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/completions", completion_body("m", "hello"))
                assert r.endpoint == POD2
            assert server.picker.stats()["scorer_outcomes"] == {"ok": 1}
            assert server.picker.stats()["decisions"] == {"kv": 1}
        finally:
            await server.stop()

    run(scenario())
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")

    async def unauthorized() -> None:
        server = await start_picker(config.model_copy(update={"scorer_token_file": str(wrong)}))
        try:
            async with EnvoyClient(f"127.0.0.1:{server.port}") as client:
                r = await client.route("/v1/completions", completion_body("m", "hello"))
                assert r.endpoint in PODS  # fail open
            assert server.picker.stats()["scorer_outcomes"] == {"unauthorized": 1}
        finally:
            await server.stop()

    run(unauthorized())


def test_scorer_token_sources(tmp_path: Path) -> None:
    assert scorer_token(ExtprocConfig(), {"KVINDEX_SCORER_TOKEN": " abc \n"}) == "abc"
    assert scorer_token(ExtprocConfig(), {}) is None
    f = tmp_path / "t"
    f.write_text("from-file\n")
    # The file wins over the environment.
    assert scorer_token(ExtprocConfig(scorer_token_file=str(f)), {"KVINDEX_SCORER_TOKEN": "env"}) == "from-file"
    f.write_text("two words\n")
    with pytest.raises(ConfigError, match="one token"):
        scorer_token(ExtprocConfig(scorer_token_file=str(f)), {})
    f.write_text("")
    with pytest.raises(ConfigError, match="one token"):
        scorer_token(ExtprocConfig(scorer_token_file=str(f)), {})
