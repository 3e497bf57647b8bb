"""``kvindex``: the project's one command line.

* ``kvindex serve``    the scoring service (HTTP + ZMQ event subscriber);
* ``kvindex extproc``  the Envoy endpoint picker (``kvindex_service.extproc.cli``);
* ``kvindex simulate`` the fleet simulator (``kvindex_service.sim.cli``).
* ``kvindex fake-pod`` a fake vLLM pod (``kvindex_service.fakepod.cli``).

Sub-commands owned by other packages are imported only when chosen, so ``kvindex serve``
never pays for gRPC or the simulator, and a missing optional package is a clear message.

``kvindex serve`` with no flags runs an in-memory index, a bind-mode SUB on
``tcp://0.0.0.0:5557`` that every vLLM pod connects to, and HTTP on port 8080 with block
size 16. Flags override the environment (``KVINDEX_*``), which overrides the YAML file
(``--config`` / ``KVINDEX_CONFIG``), which overrides the defaults.

A bad flag, port, config file or an unusable component at start ends ``serve`` with one
line on stderr naming the problem and the value, and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kvindex_service.argparsing import OneLineParser

if TYPE_CHECKING:
    import uvicorn

__all__ = ["build_parser", "main", "serve_overrides"]

logger = logging.getLogger("kvindex_service.cli")

_DELEGATED = {
    "extproc": ("kvindex_service.extproc.cli", "the Envoy ext_proc endpoint picker"),
    "simulate": ("kvindex_service.sim.cli", "the vLLM fleet simulator"),
    "fake-pod": ("kvindex_service.fakepod.cli", "a fake vLLM pod publishing real KV events (local fleets, tests)"),
}


def _fail(message: str) -> int:
    print(f"kvindex serve: {message}", file=sys.stderr)
    return 2


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvindex")
    except PackageNotFoundError:  # pragma: no cover - a source checkout without install
        from kvindex_service import __version__

        return str(__version__)


def _key_value(flag: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{flag} expects KEY=VALUE, got {text!r}")
    return key, value


def _pod(text: str) -> dict[str, Any]:
    pod_id, endpoints = _key_value("--pod", text)
    endpoint, _, replay = endpoints.partition(",")
    return {"pod_id": pod_id, "endpoint": endpoint, "replay_endpoint": replay or None}


def _tokenizer(text: str) -> tuple[str, str]:
    return _key_value("--tokenizer", text)


def _chat_template(text: str) -> tuple[str, str]:
    return _key_value("--chat-template", text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvindex",
        description="KV-cache-aware routing index for vLLM fleets.",
    )
    parser.add_argument("--version", action="version", version=f"kvindex {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the scoring service (HTTP API + ZMQ KV-event subscriber)",
        description="Run the scoring service. Flags override KVINDEX_* environment "
        "variables, which override the YAML config file, which overrides the defaults.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config file (default: $KVINDEX_CONFIG)")
    serve.add_argument("--host", help="HTTP listen address (default 0.0.0.0)")
    serve.add_argument("--port", type=_port, help="HTTP port (default 8080; 0 picks a free one)")
    serve.add_argument(
        "--zmq-bind",
        metavar="ENDPOINT",
        help="SUB endpoint the pods connect to (default tcp://0.0.0.0:5557; 'none' disables)",
    )
    serve.add_argument(
        "--pod",
        action="append",
        type=_pod,
        metavar="ID=ENDPOINT[,REPLAY]",
        help="connect to a pod's publisher (repeatable), e.g. 10.0.0.1:8000=tcp://10.0.0.1:5557",
    )
    serve.add_argument("--block-size", type=int, help="KV block size in tokens (default 16)")
    serve.add_argument("--hash-seed", help="vLLM's PYTHONHASHSEED (default: unset)")
    serve.add_argument("--hash-algo", help="block-key algorithm (default sha256_cbor)")
    serve.add_argument(
        "--index-backend", metavar="URL", help="memory (default) or a shared index: redis://host:port/db, valkey://..."
    )
    serve.add_argument(
        "--tokenizer",
        action="append",
        type=_tokenizer,
        metavar="MODEL=PATH",
        help="tokenizer dir, tokenizer.json or cached HF repo id for a model (repeatable)",
    )
    serve.add_argument(
        "--chat-template",
        action="append",
        type=_chat_template,
        metavar="MODEL=FILE",
        help="chat template for a model, like vLLM's --chat-template (repeatable)",
    )
    serve.add_argument(
        "--auth-token-file",
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' (token read from FILE) on all but the probes",
    )
    serve.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve HTTPS (with --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    serve.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    serve.add_argument(
        "--discover",
        action="store_true",
        default=None,
        help="Kubernetes pod discovery: subscribe to the Ready pods --discovery-selector finds",
    )
    serve.add_argument("--discovery-selector", metavar="SELECTOR", help="pod label selector, e.g. app=vllm")
    serve.add_argument(
        "--discovery-namespace", metavar="NS", help="namespace to watch (default: the pod's own or the context's)"
    )
    serve.add_argument(
        "--warm-from", metavar="URL", help="a peer replica's base URL: load its GET /snapshot before subscribing"
    )
    serve.add_argument(
        "--snapshot-file",
        metavar="PATH",
        help="load this snapshot at start (missing: cold start); write it on shutdown and every snapshot.interval",
    )
    for name, (_, help_text) in _DELEGATED.items():
        delegated = sub.add_parser(name, help=help_text, add_help=False)
        delegated.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, shaped like :class:`Settings` (flags left out
    do not override anything)."""
    out: dict[str, Any] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            out.setdefault(section, {})[key] = value

    put("http", "host", args.host)
    put("http", "port", args.port)
    put("http", "tls_cert", args.tls_cert)
    put("http", "tls_key", args.tls_key)
    if args.auth_token_file is not None:
        token = Path(args.auth_token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file} is empty")
        put("http", "auth_token", token)
    put("zmq", "bind", args.zmq_bind)
    put("zmq", "pods", args.pod)
    put("index", "block_size", args.block_size)
    put("index", "hash_seed", args.hash_seed)
    put("index", "hash_algo", args.hash_algo)
    put("index", "backend", args.index_backend)
    put("tokenizers", "sources", dict(args.tokenizer) if args.tokenizer else None)
    put("tokenizers", "chat_templates", dict(args.chat_template) if args.chat_template else None)
    put("log", "level", args.log_level)
    put("log", "json", args.log_json)
    put("discovery", "enabled", args.discover)
    put("discovery", "label_selector", args.discovery_selector)
    put("discovery", "namespace", args.discovery_namespace)
    put("snapshot", "warm_from", args.warm_from)
    put("snapshot", "file", args.snapshot_file)
    return out


def _serve(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from kvindex_service.config import load_settings
    from kvindex_service.log import configure_logging

    try:
        settings = load_settings(args.config, serve_overrides(args))
    except ValidationError as exc:
        return _fail(f"invalid configuration: {_validation_line(exc)}")
    except OSError as exc:
        return _fail(f"cannot read {exc.filename or 'a file'}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return _fail(f"config file {args.config or '$KVINDEX_CONFIG'} is not valid YAML: {problem}{where}")
    except ValueError as exc:
        return _fail(f"invalid configuration: {exc}")
    tls_error = _check_tls(settings.http)
    if tls_error is not None:
        return _fail(tls_error)
    configure_logging(settings.log.level, settings.log.json_)
    return asyncio.run(_run_server(settings))


def _validation_line(exc: Any) -> str:
    """A pydantic ValidationError as one line: ``loc: message (got value)`` per error."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "settings"
        value = err.get("input")
        got = "" if isinstance(value, dict) else f" (got {value!r})"
        parts.append(f"{loc}: {err.get('msg', '')}{got}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f"; +{more} more" if more > 0 else "")


def _check_tls(http: Any) -> str | None:
    """Load the certificate and key once up front, so a bad pair is one clear line."""
    if http.tls_cert is None:
        return None
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(http.tls_cert, http.tls_key)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot use TLS certificate {http.tls_cert} with key {http.tls_key}: {exc}"
    return None


async def _run_server(settings: Any) -> int:
    import uvicorn

    from kvindex_service.api import create_app
    from kvindex_service.runtime import Runtime

    http = settings.http
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and without it Nagle holds every response body back for the client's
    # delayed ACK (~40 ms per request on Linux).
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        return _fail(f"cannot listen on {http.host}:{http.port}: {exc}")
    try:
        # Bind here, not in uvicorn, so the real port is known (and logged) even for port 0.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((http.host, http.port))
        # Listen now: a client that read the logged address may connect at once; the kernel
        # queues it until uvicorn accepts (after the runtime has started).
        sock.listen(2048)
    except (OSError, OverflowError) as exc:
        sock.close()
        return _fail(f"cannot listen on {http.host}:{http.port}: {exc}")
    port = sock.getsockname()[1]
    loop = asyncio.get_running_loop()
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:  # from the tokenizer preload thread
        fatal.append(message)
        if server is not None:
            loop.call_soon_threadsafe(setattr, server, "should_exit", True)

    # The CLI starts the runtime itself (the app borrows it), so that a component that
    # cannot start is one line and exit 2 rather than uvicorn's startup traceback.
    runtime = Runtime(settings, strict_tokenizers=True, on_fatal=on_fatal)
    try:
        await asyncio.to_thread(runtime.start)
    except Exception as exc:
        sock.close()
        return _fail(f"cannot start: {_one_line(exc)}")
    config = uvicorn.Config(
        create_app(runtime=runtime),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
        ssl_certfile=http.tls_cert,
        ssl_keyfile=http.tls_key,
    )
    server = _server_class()(config)
    if fatal:
        server.should_exit = True
    scheme = "https" if http.tls_cert else "http"
    logger.info("serving HTTP", extra={"http": f"{scheme}://{http.host}:{port}"})
    try:
        # uvicorn installs SIGINT/SIGTERM handlers: a signal ends serve() after in-flight
        # requests finish.
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await asyncio.to_thread(runtime.stop)
    if fatal:
        return _fail(fatal[0])
    if not server.started:
        return 1
    logger.info("stopped")
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:400] + "..."


def _server_class() -> type[uvicorn.Server]:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, minus re-raising the caught SIGTERM/SIGINT after shutdown
        (uvicorn does so to let the default handler run, which would turn a clean,
        graceful stop into exit status -15 / KeyboardInterrupt)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for requests
            else:
                self.should_exit = True

    return GracefulServer


def _delegate(command: str, argv: list[str]) -> int:
    module_name, _ = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"kvindex {command}: not available ({module_name} cannot be imported: {exc})", file=sys.stderr)
        return 2
    result = module.main(argv)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Delegated commands get their raw arguments, including their own --help.
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
