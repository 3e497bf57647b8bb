"""Shared set-up for the fake-pod tests: a real ``kvindex serve`` subprocess and fake pods
running in-process under uvicorn, all on ephemeral loopback ports, over real ZMQ."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from kvindex_service.fakepod import FakePod, FakePodConfig
from kvindex_service.fakepod.app import create_app
from tests.conftest import terminate

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.2-3B-Instruct"
WAIT = 60.0


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVINDEX_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_for(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``pred`` until it returns something truthy (a deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Service:
    """``kvindex serve`` as a real subprocess: HTTP on a free port, bind-mode ZMQ SUB."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvindex_service", "serve", "--host", "127.0.0.1", "--port", "0",
             "--zmq-bind", "tcp://127.0.0.1:*", "--log-json", *extra],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        try:
            self.zmq = self._line(r'"zmq_bind":"(tcp://127\.0\.0\.1:\d+)"')
            self.url = self._line(r'"http":"(http://127\.0\.0\.1:\d+)"')
            self.http = httpx.Client(base_url=self.url, timeout=30.0)
            wait_for(lambda: self.http.get("/readyz").status_code == 200, "serve /readyz")
        except BaseException:
            self.close()
            raise
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _line(self, pattern: str) -> str:
        assert self.proc.stderr is not None
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError("kvindex serve exited:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m.group(1)

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def score(self, **body: Any) -> dict[str, Any]:
        r = self.http.post("/score", json={"model": MODEL, **body})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def pod(self, pod_id: str) -> dict[str, Any] | None:
        pods = self.http.get("/pods").json()["pods"]
        return next((p for p in pods if p["pod"] == pod_id), None)

    def synced(self, pod: RunningPod) -> dict[str, Any]:
        """Wait until the service has applied every batch the pod published; its /pods row."""
        last = pod.engine.publisher.next_seq - 1

        def done() -> dict[str, Any] | None:
            row = self.pod(pod.pod_id)
            return row if row is not None and row["last_seq"] == last else None

        result: dict[str, Any] = wait_for(done, f"pod {pod.pod_id} at seq {last}")
        return result

    def close(self) -> None:
        if getattr(self, "http", None) is not None:
            self.http.close()
        terminate(self.proc, 30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class RunningPod:
    """A FakePod served by uvicorn on a thread, on a free loopback port."""

    def __init__(self, zmq_endpoint: str, **kw: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        port = self.sock.getsockname()[1]
        self.pod_id: str = kw.pop("pod_id", f"127.0.0.1:{port}")
        self.url = f"http://127.0.0.1:{port}"
        max_body = kw.pop("max_body_bytes", 4 * 1024 * 1024)
        self.engine = FakePod(FakePodConfig(pod_id=self.pod_id, model=MODEL, zmq_endpoint=zmq_endpoint, **kw))
        self.engine.start()
        config = uvicorn.Config(create_app(self.engine, max_body_bytes=max_body), log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "uvicorn start")
        self.http = httpx.Client(base_url=self.url, timeout=30.0)

    def wait_subscribed(self) -> None:
        wait_for(lambda: self.http.get("/health").json()["subscribed"], f"{self.pod_id} subscribed")

    def complete(self, prompt: Any, **extra: Any) -> dict[str, Any]:
        r = self.http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **extra})
        assert r.status_code == 200, r.text
        assert r.headers["x-kvindex-pod"] == self.pod_id
        out: dict[str, Any] = r.json()
        return out

    def chat(self, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        r = self.http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **extra})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def prompt_text(topic: str, sentences: int = 6) -> str:
    """A prompt of several blocks, unique per ``topic``."""
    body = " ".join(f"Section {i} of the {topic} handbook explains step {i} in plain words." for i in range(sentences))
    return f"You are the {topic} assistant. {body} Question: what comes first?"
