"""``make fleet``: a scoring service, the Envoy picker and two fake vLLM pods on loopback.

    python -m kvindex_service.fakepod.fleet [--http-port 8080] [--zmq-port 5557] ...

Order: ``kvindex serve`` (HTTP, and a bind-mode ZMQ SUB the pods connect to) -> fake pods A
and B (their events go to the service; pod ids ``127.0.0.1:PORT`` pass the service's peer
verification) -> ``kvindex extproc`` with both pods as endpoints and the service as scorer.
Each child logs JSON lines; the fleet waits for each one's ready line (and for each pod's
publisher to be subscribed), echoes the children's messages with a name prefix, prints how
to send a request, and stops every child on Ctrl-C / SIGTERM. Port 0 picks free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

__all__ = ["Fleet", "FleetPorts", "main"]

DEFAULT_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
START_TIMEOUT = 120.0
DEMO_PROMPT = (
    "You are a support assistant for a cloud storage company. Answer using only the documents below, "
    "cite the section you used, and say so when the documents do not cover the question."
)


@dataclass
class FleetPorts:
    http: int = 8080
    zmq: int = 5557
    picker: int = 9002
    pods: tuple[int, int] = (8001, 8002)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None


class Fleet:
    """The four processes; ``start`` returns once all are ready, ``stop`` ends them all."""

    def __init__(
        self,
        ports: FleetPorts | None = None,
        *,
        model: str = DEFAULT_MODEL,
        hash_seed: str | None = None,
        capacity: int = 4096,
        scorer_timeout_ms: float = 1000.0,
        env: Mapping[str, str] | None = None,
        echo: TextIO | None = sys.stderr,
    ) -> None:
        self.ports = ports or FleetPorts()
        self.model = model
        self.hash_seed = hash_seed
        self.capacity = capacity
        self.scorer_timeout_ms = scorer_timeout_ms
        self.env = dict(os.environ if env is None else env)
        self.echo = echo
        self.children: list[_Child] = []
        self.service_url = ""
        self.zmq_endpoint = ""
        self.pod_urls: dict[str, str] = {}
        """Pod id -> base URL, A first."""
        self.picker_address = ""

    # -- children ----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> _Child:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvindex_service", *args, "--log-json"],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        child = _Child(name, proc)
        child.thread = threading.Thread(target=self._pump, args=(child,), name=f"fleet-{name}", daemon=True)
        child.thread.start()
        self.children.append(child)
        return child

    def _pump(self, child: _Child) -> None:
        assert child.proc.stderr is not None
        for line in child.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"msg": line.rstrip()}
            if not isinstance(record, dict):
                record = {"msg": line.rstrip()}
            with child.cond:
                child.records.append(record)
                child.cond.notify_all()
            if self.echo is not None:
                print(f"[{child.name}] {_describe(record)}", file=self.echo, flush=True)
        with child.cond:
            child.cond.notify_all()

    def _wait_record(self, child: _Child, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        with child.cond:
            while True:
                for record in child.records:
                    if pred(record):
                        return record
                if child.proc.poll() is not None and not (child.thread and child.thread.is_alive()):
                    tail = "; ".join(str(r.get("msg", r)) for r in child.records[-3:])
                    raise RuntimeError(f"{child.name} exited ({child.proc.returncode}) before {what}: {tail}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{child.name}: no {what} within {START_TIMEOUT:.0f} s")
                child.cond.wait(min(left, 0.5))

    @staticmethod
    def _poll(url: str, ok: Callable[[httpx.Response], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                try:
                    if ok(client.get(url)):
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{what} not ready within {START_TIMEOUT:.0f} s ({url})")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        p = self.ports
        seed = ["--hash-seed", self.hash_seed] if self.hash_seed is not None else []
        zmq_port = str(p.zmq) if p.zmq else "*"
        serve = self._spawn("serve", ["serve", "--host", "127.0.0.1", "--port", str(p.http),
                                      "--zmq-bind", f"tcp://127.0.0.1:{zmq_port}", *seed])  # fmt: skip
        self.zmq_endpoint = self._wait_record(serve, lambda r: "zmq_bind" in r, "ZMQ endpoint")["zmq_bind"]
        self.service_url = self._wait_record(serve, lambda r: "http" in r, "HTTP address")["http"]
        self._poll(f"{self.service_url}/readyz", lambda r: r.status_code == 200, "kvindex serve")
        pods = []
        for name, port in zip(("pod-a", "pod-b"), p.pods, strict=True):
            pods.append(
                self._spawn(name, ["fake-pod", "--host", "127.0.0.1", "--port", str(port), "--model", self.model,
                                   "--zmq-endpoint", self.zmq_endpoint, "--capacity", str(self.capacity), *seed])
            )  # fmt: skip
        for pod in pods:
            ready = self._wait_record(pod, lambda r: r.get("msg") == "fake pod ready", "ready line")
            self.pod_urls[ready["pod_id"]] = ready["http"]
        for pod_id, url in self.pod_urls.items():
            self._poll(f"{url}/health", lambda r: r.status_code == 200 and r.json()["subscribed"], f"pod {pod_id}")
        endpoints = [arg for pod_id in self.pod_urls for arg in ("--endpoint", pod_id)]
        picker = self._spawn("extproc", ["extproc", "--host", "127.0.0.1", "--port", str(p.picker),
                                         "--scorer-url", self.service_url, "--timeout-ms", str(self.scorer_timeout_ms),
                                         *endpoints, "--metrics-port", "0", "--health-port", "0"])  # fmt: skip
        ready = self._wait_record(picker, lambda r: r.get("msg") == "picker ready", "ready line")
        self.picker_address = f"127.0.0.1:{ready['port']}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every child still running (the picker first), then wait; kill stragglers."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            if child.thread is not None:
                child.thread.join(5)
            if child.proc.stderr is not None:
                child.proc.stderr.close()
        self.children = []

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def instructions(self) -> str:
        (a_id, a_url), (b_id, b_url) = self.pod_urls.items()
        body = json.dumps({"model": self.model, "prompt": DEMO_PROMPT, "max_tokens": 16})
        score = json.dumps({"model": self.model, "prompt": DEMO_PROMPT})
        return "\n".join([
            "kvindex fleet is up (Ctrl-C stops it):",
            f"  scoring service  {self.service_url}   (ZMQ SUB {self.zmq_endpoint})",
            f"  fake pod A       {a_url}   pod id {a_id}",
            f"  fake pod B       {b_url}   pod id {b_id}",
            f"  picker (Envoy ext_proc gRPC)  {self.picker_address}  endpoints {a_id}, {b_id}",
            "",
            "Send a completion to pod A, then ask the service which pod holds the prompt:",
            f"  curl -s {a_url}/v1/completions -H 'content-type: application/json' -d '{body}'",
            f"  curl -s {self.service_url}/score -H 'content-type: application/json' -d '{score}'",
            "Send it to A again: usage.prompt_tokens_details.cached_tokens grows. Per-pod stream state:",
            f"  curl -s {self.service_url}/pods",
        ])  # fmt: skip


def _describe(record: dict[str, Any]) -> str:
    """A child's JSON log record as one short text line: level, message, extras."""
    extras = " ".join(f"{k}={v}" for k, v in record.items() if k not in ("ts", "level", "logger", "msg"))
    return " ".join(str(x) for x in (record.get("level", ""), record.get("msg", ""), extras) if x)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fleet", description="Run serve, extproc and two fake vLLM pods on loopback.")
    p.add_argument("--http-port", type=_port, default=8080, help="scoring service HTTP port (0: any)")
    p.add_argument("--zmq-port", type=_port, default=5557, help="service's bind-mode ZMQ port (0: any)")
    p.add_argument("--picker-port", type=_port, default=9002, help="picker gRPC port (0: any)")
    p.add_argument("--pod-ports", type=_port, nargs=2, default=[8001, 8002], metavar="PORT", help="pods A and B")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--hash-seed", help="PYTHONHASHSEED analog for the service and the pods")
    p.add_argument("--capacity", type=int, default=4096, help="KV blocks per fake pod")
    p.add_argument("--scorer-timeout-ms", type=float, default=1000.0, help="picker's scorer deadline (ms)")
    args = p.parse_args(argv)
    ports = FleetPorts(args.http_port, args.zmq_port, args.picker_port, (args.pod_ports[0], args.pod_ports[1]))
    fleet = Fleet(
        ports,
        model=args.model,
        hash_seed=args.hash_seed,
        capacity=args.capacity,
        scorer_timeout_ms=args.scorer_timeout_ms,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        fleet.start()
        print(fleet.instructions(), flush=True)
        while all(c.proc.poll() is None for c in fleet.children):
            time.sleep(0.5)
        gone = [f"{c.name} ({c.proc.returncode})" for c in fleet.children if c.proc.poll() is not None]
        print(f"fleet: exited: {', '.join(gone)}; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        return 1
    finally:
        fleet.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
