"""``kvindex fake-pod``: a fake vLLM pod for local fleets and tests.

    kvindex fake-pod --port 8001 --zmq-endpoint tcp://127.0.0.1:5557 \\
        --model meta-llama/Llama-3.2-3B-Instruct

Serves OpenAI completions and chat completions with made-up text and real ``usage`` numbers,
keeps the simulator's prefix-caching block pool, and publishes the pool's KV events in a
chosen vLLM version's wire format on topic ``kv@<pod-id>@<model>``. The publisher binds when
``--zmq-endpoint`` has ``*``, ``::``, ``ipc://`` or ``inproc://`` and connects otherwise, as
vLLM does. A bad flag or an unusable port, socket or tokenizer ends the command with one line
on stderr and exit status 2 (no traceback). Manual: docs/fleet.md.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

from kvindex_service._native import index_defaults
from kvindex_service.argparsing import OneLineParser
from kvindex_service.fakepod.engine import FakePod, FakePodConfig, binds
from kvindex_service.fakepod.wire import ALIASES, FORMATS

__all__ = ["build_parser", "main"]

PROG = "kvindex fake-pod"
DEFAULT_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
log = logging.getLogger(__name__)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _key_value(flag: str) -> Callable[[str], tuple[str, str]]:
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"{flag} expects MODEL=VALUE, got {text!r}")
        return key, value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="A fake vLLM pod: OpenAI API, prefix-caching block pool, real KV events.")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000; 0 picks a free one)")
    p.add_argument("--pod-id", help="pod id in the event topic (default HOST:PORT)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"served model name (default {DEFAULT_MODEL})")
    p.add_argument(
        "--zmq-endpoint",
        default="tcp://*:5557",
        metavar="ENDPOINT",
        help="KV-event publisher endpoint: bound if it has '*', '::', ipc:// or inproc://, else "
        "connected (default tcp://*:5557)",
    )
    p.add_argument("--replay-endpoint", metavar="ENDPOINT", help="bind vLLM's replay ROUTER here (default: none)")
    p.add_argument("--block-size", type=_positive, default=16, help="KV block size in tokens (default 16)")
    p.add_argument("--capacity", type=_positive, default=4096, help="KV blocks in the pool (default 4096)")
    p.add_argument(
        "--vllm-format",
        default="0.33",
        choices=[*FORMATS, *ALIASES],
        help="KV-event shape of a vLLM version: 0.33 (maps, replay with topic), 0.24 (maps), 0.23 (arrays), "
        "0.11 (arrays up to medium); map = 0.33, array = 0.23 (default 0.33)",
    )
    p.add_argument(
        "--hash-seed", default=index_defaults()["hash_seed"], help="vLLM's PYTHONHASHSEED, as serve's (default: unset)"
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        type=_key_value("--tokenizer"),
        metavar="MODEL=PATH",
        help="tokenizer dir, tokenizer.json or cached HF repo id (default: the bundled Llama 3.2)",
    )
    p.add_argument(
        "--chat-template", action="append", type=_key_value("--chat-template"), metavar="MODEL=FILE",
        help="chat template for the model (vLLM's option of that name)",
    )  # fmt: skip
    p.add_argument("--max-prompt-tokens", type=_positive, default=32_768, help="longer prompts get 400 (default 32768)")
    p.add_argument("--max-body-bytes", type=_positive, default=4 * 1024 * 1024, help="larger bodies get 413 (4 MiB)")
    p.add_argument("--buffer-steps", type=_positive, default=10_000, help="batches the replay socket keeps (10000)")
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    return p


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from kvindex_service.log import configure_logging

    configure_logging(args.log_level, args.log_json)
    if args.pod_id is None and _is_wildcard(args.host):
        return _fail(f"--host {args.host} is not a routable pod id: give --pod-id IP:PORT")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
        sock.listen(512)
    except (OSError, OverflowError) as exc:
        sock.close()
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc}")
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    config = FakePodConfig(
        pod_id=args.pod_id or f"{host}:{port}",
        model=args.model,
        zmq_endpoint=args.zmq_endpoint,
        replay_endpoint=args.replay_endpoint,
        block_size=args.block_size,
        capacity=args.capacity,
        vllm_format=args.vllm_format,
        hash_seed=args.hash_seed,
        tokenizers=dict(args.tokenizer or ()),
        chat_templates=dict(args.chat_template or ()),
        max_prompt_tokens=args.max_prompt_tokens,
        buffer_steps=args.buffer_steps,
    )
    try:
        pod = FakePod(config)
        pod.start()
    except Exception as exc:
        sock.close()
        return _fail(" ".join(str(exc).split()) or type(exc).__name__)
    return asyncio.run(_serve(pod, sock, args.max_body_bytes, f"http://{host}:{port}"))


async def _serve(pod: FakePod, sock: socket.socket, max_body_bytes: int, url: str) -> int:
    import uvicorn

    from kvindex_service.fakepod.app import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Stop gracefully without re-raising the signal afterwards (exit 0, no traceback).
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True

    config = uvicorn.Config(
        create_app(pod, max_body_bytes=max_body_bytes),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = Server(config)
    pub = pod.publisher
    log.info(
        "fake pod ready",
        extra={
            "pod_id": pod.config.pod_id,
            "model": pod.config.model,
            "http": url,
            "zmq": pub.endpoint,
            "zmq_mode": "bind" if binds(pod.config.zmq_endpoint) else "connect",
            "replay": pub.replay_endpoint,
            "vllm_format": pod.format.name,
        },
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1
