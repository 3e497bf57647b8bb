"""``kvindex extproc``: run the Envoy ext_proc endpoint picker.

    kvindex extproc --port 9002 --scorer-url http://kvindex:8080 \\
        --endpoint 10.0.0.1:8000 --endpoint 10.0.0.2:8000 --metrics-port 9090
    kvindex extproc --pool-name vllm --pool-namespace llm --scorer-url http://kvindex:8080

Flags override a YAML file (``--config``; the picker's fields at the top level or under an
``extproc:`` key). SIGTERM/SIGINT stop the server gracefully (in-flight streams get
``--grace`` seconds).

Every unusable flag, config file or port ends the command with one line on stderr naming
the problem and the value, and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvindex_service.argparsing import OneLineParser
from kvindex_service.extproc.app import start_picker
from kvindex_service.extproc.config import DEFAULT_SESSION_HEADER, ExtprocConfig
from kvindex_service.extproc.security import SCORER_TOKEN_ENV, ConfigError, scorer_token

__all__ = ["build_config", "build_parser", "format_validation_error", "main"]

log = logging.getLogger(__name__)

PROG = "kvindex extproc"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Config fields set by a flag, for error messages that name what the user typed.
_FLAG_OF = {
    "endpoints": "--endpoint",
    "scorer_url": "--scorer-url",
    "timeout_ms": "--timeout-ms",
    "session_header": "--session-header",
    "max_inflight": "--max-inflight",
    "metrics_port": "--metrics-port",
    "metrics_host": "--metrics-host",
    "affinity_margin": "--affinity-margin",
    "release_on": "--release-on",
    "weights.kv": "--kv-weight",
    "weights.load": "--load-weight",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_client_ca": "--tls-client-ca",
    "scorer_ca_file": "--scorer-ca-file",
    "scorer_token_file": "--scorer-token-file",
    "pool_name": "--pool-name",
    "pool_namespace": "--pool-namespace",
    "endpoint_selector": "--endpoint-selector",
    "endpoint_target_ports": "--endpoint-target-ports",
    "kubeconfig": "--kubeconfig",
}


def _port(kind: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number ({kind})") from None
        if not 0 <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{value} is not a port: expected 1-65535 (or {kind})")
        return value

    return parse


def _ports(text: str) -> list[int]:
    parse = _port("a serving port")
    out = [parse(item.strip()) for item in text.split(",") if item.strip()]
    if not out or 0 in out:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ports like 8000 or 8000,8001")
    return out


def _grace(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Envoy ext_proc KV-cache-aware endpoint picker")
    p.add_argument("--config", help="YAML file with the picker settings")
    p.add_argument("--host", default="0.0.0.0", help="gRPC listen address (default 0.0.0.0: all interfaces)")
    p.add_argument("--port", type=_port("0 = any free port"), default=9002, help="gRPC port (default 9002, 0 = any)")
    p.add_argument("--scorer-url", help="scoring service base URL (POST {url}/score); unset = no KV scores")
    p.add_argument("--scorer-ca-file", metavar="PEM", help="CA bundle that verifies an https:// scorer")
    p.add_argument(
        "--scorer-token-file",
        metavar="PATH",
        help=f"bearer token sent to the scorer (default: ${SCORER_TOKEN_ENV} if set)",
    )
    p.add_argument(
        "--endpoint", action="append", default=None, metavar="IP:PORT", help="eligible endpoint (repeatable)"
    )
    p.add_argument("--pool-name", metavar="NAME", help="GAIE InferencePool whose Ready pods are the endpoints")
    p.add_argument("--pool-namespace", metavar="NS", help="namespace of the pool (default: the picker's own)")
    p.add_argument(
        "--endpoint-selector", metavar="LABELS", help="without a pool: label selector of the endpoint pods (app=vllm)"
    )
    p.add_argument(
        "--endpoint-target-ports", type=_ports, metavar="PORTS", help="with --endpoint-selector: serving port(s), 8000"
    )
    p.add_argument("--kubeconfig", metavar="PATH", help="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    p.add_argument(
        "--health-port",
        type=_port("0 = any free port"),
        default=9003,
        help="gRPC health port: liveness, readiness, inference-extension (default 9003)",
    )
    p.add_argument(
        "--ready-without-scorer",
        action="store_true",
        default=None,
        help="report ready before the scorer answers (picks by load and affinity meanwhile)",
    )
    p.add_argument("--timeout-ms", type=float, help="scorer deadline in ms (default 50)")
    p.add_argument("--session-header", help=f"session affinity header (default {DEFAULT_SESSION_HEADER})")
    p.add_argument("--max-inflight", type=int, help="per-endpoint in-flight cap; all at cap -> 429")
    p.add_argument("--metrics-port", type=_port("0 = off"), help="Prometheus port (0 = off)")
    p.add_argument("--metrics-host", help="Prometheus listen address (default 0.0.0.0: all interfaces)")
    p.add_argument("--tls-cert", metavar="PEM", help="certificate chain: the gRPC server speaks TLS only")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--kv-weight", type=float, help="weight of the cached prefix fraction (default 1.0)")
    p.add_argument("--load-weight", type=float, help="cost of one extra in-flight request (default 0.1)")
    p.add_argument("--affinity-margin", type=float, help="prefix fraction needed to move a session (default 0.25)")
    p.add_argument("--release-on", choices=["response_headers", "response_end"], help="when in-flight counts drop")
    p.add_argument("--grace", type=_grace, default=5.0, help="seconds to drain streams on shutdown")
    p.add_argument("--log-level", type=str.upper, choices=_LEVELS, default="INFO")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    return p


def _load_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--config {path!r}: cannot read it ({reason})") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"--config {path!r}: not valid YAML ({problem}{where})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path!r}: the top level must be a mapping")
    section = loaded.get("extproc", loaded)
    if not isinstance(section, dict):
        raise ConfigError(f"--config {path!r}: 'extproc' must be a mapping")
    return dict(section)


def build_config(args: argparse.Namespace) -> ExtprocConfig:
    """The flags over the YAML file; raises ConfigError or pydantic's ValidationError."""
    data: dict[str, Any] = _load_yaml(args.config) if args.config else {}
    flags = {
        "scorer_url": args.scorer_url,
        "scorer_ca_file": args.scorer_ca_file,
        "scorer_token_file": args.scorer_token_file,
        "endpoints": args.endpoint,
        "timeout_ms": args.timeout_ms,
        "session_header": args.session_header,
        "max_inflight": args.max_inflight,
        "metrics_port": args.metrics_port,
        "metrics_host": args.metrics_host,
        "affinity_margin": args.affinity_margin,
        "release_on": args.release_on,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "pool_name": args.pool_name,
        "pool_namespace": args.pool_namespace,
        "endpoint_selector": args.endpoint_selector,
        "endpoint_target_ports": args.endpoint_target_ports,
        "kubeconfig": args.kubeconfig,
        "ready_without_scorer": args.ready_without_scorer,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    weights = data.get("weights") or {}
    if not isinstance(weights, dict):
        raise ConfigError(f"weights {weights!r}: expected a mapping like {{kv: 1.0, load: 0.1}}")
    weights = dict(weights)
    if args.kv_weight is not None:
        weights["kv"] = args.kv_weight
    if args.load_weight is not None:
        weights["load"] = args.load_weight
    if weights:
        data["weights"] = weights
    return ExtprocConfig.model_validate(data)


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's multi-line report as one line: ``field (--flag) value: problem; ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int))
        name = loc or "config"
        flag = _FLAG_OF.get(loc)
        if flag:
            name += f" ({flag})"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{name}: unknown setting")
        elif err["type"] == "value_error":
            parts.append(f"{name}: {msg}" if loc else msg)  # our own messages quote the value already
        else:
            parts.append(f"{name} {err.get('input')!r}: {msg}")
    return "; ".join(parts)


async def _serve(
    config: ExtprocConfig, host: str, port: int, health_port: int, grace: float, token: str | None
) -> None:
    server = await start_picker(config, host=host, port=port, scorer_bearer=token, health_port=health_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    log.info(
        "picker ready",
        extra={"port": server.port, "health_port": server.health_port, "metrics_port": server.metrics_port},
    )
    try:
        await stop.wait()
    finally:
        await server.stop(grace)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Entry point of ``kvindex extproc``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from kvindex_service.log import configure_logging

    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        config = build_config(args)
        token = scorer_token(config) if config.scorer_url else None
    except ValidationError as exc:
        return _fail(format_validation_error(exc))
    except ConfigError as exc:
        return _fail(str(exc))
    if not config.endpoints and not config.watches_kubernetes:
        log.warning(
            "no --endpoint, --pool-name or --endpoint-selector given: only requests with an Envoy subset hint "
            "can be routed (the hint is taken as the endpoint list)"
        )
    if not config.scorer_url:
        log.warning("no --scorer-url given: routing without KV-cache scores (by load and session affinity only)")
    elif token and config.scorer_url.startswith("http://"):
        log.warning("the scorer token is sent over plain http: use an https:// --scorer-url")
    try:
        asyncio.run(_serve(config, args.host, args.port, args.health_port, args.grace, token))
    except ConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(exc.strerror if exc.strerror and exc.errno else str(exc))
    return 0
