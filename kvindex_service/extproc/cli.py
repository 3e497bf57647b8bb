"""``kvindex extproc``: run the Envoy ext_proc endpoint picker.

    kvindex extproc --port 9002 --scorer-url http://kvindex:8080 \\
        --endpoint 10.0.0.1:8000 --endpoint 10.0.0.2:8000 --metrics-port 9090

Flags override a YAML file (``--config``; the picker's fields at the top level or under an
``extproc:`` key). SIGTERM/SIGINT stop the server gracefully (in-flight streams get
``--grace`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvindex_service.extproc.config import DEFAULT_SESSION_HEADER, ExtprocConfig
from kvindex_service.extproc.server import start_picker

__all__ = ["build_config", "build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvindex extproc", description="Envoy ext_proc KV-cache-aware endpoint picker")
    p.add_argument("--config", help="YAML file with the picker settings")
    p.add_argument("--host", default="0.0.0.0", help="gRPC listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9002, help="gRPC port (default 9002, 0 = any)")
    p.add_argument("--scorer-url", help="scoring service base URL (POST {url}/score)")
    p.add_argument(
        "--endpoint", action="append", default=None, metavar="IP:PORT", help="eligible endpoint (repeatable)"
    )
    p.add_argument("--timeout-ms", type=float, help="scorer deadline in ms (default 50)")
    p.add_argument("--session-header", help=f"session affinity header (default {DEFAULT_SESSION_HEADER})")
    p.add_argument("--max-inflight", type=int, help="per-endpoint in-flight cap; all at cap -> 429")
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0 = off)")
    p.add_argument("--kv-weight", type=float, help="weight of the cached prefix fraction (default 1.0)")
    p.add_argument("--load-weight", type=float, help="cost of one extra in-flight request (default 0.1)")
    p.add_argument("--affinity-margin", type=float, help="prefix fraction needed to move a session (default 0.25)")
    p.add_argument("--release-on", choices=["response_headers", "response_end"], help="when in-flight counts drop")
    p.add_argument("--grace", type=float, default=5.0, help="seconds to drain streams on shutdown")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    return p


def build_config(args: argparse.Namespace) -> ExtprocConfig:
    data: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: top level must be a mapping")
        data = dict(loaded.get("extproc", loaded))
    flags = {
        "scorer_url": args.scorer_url,
        "endpoints": args.endpoint,
        "timeout_ms": args.timeout_ms,
        "session_header": args.session_header,
        "max_inflight": args.max_inflight,
        "metrics_port": args.metrics_port,
        "affinity_margin": args.affinity_margin,
        "release_on": args.release_on,
    }
    data.update({k: v for k, v in flags.items() if v is not None})
    weights = dict(data.get("weights") or {})
    if args.kv_weight is not None:
        weights["kv"] = args.kv_weight
    if args.load_weight is not None:
        weights["load"] = args.load_weight
    if weights:
        data["weights"] = weights
    return ExtprocConfig.model_validate(data)


async def _serve(config: ExtprocConfig, host: str, port: int, grace: float) -> None:
    server = await start_picker(config, host=host, port=port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    log.info("picker ready", extra={"port": server.port, "metrics_port": server.metrics_port})
    try:
        await stop.wait()
    finally:
        await server.stop(grace)


def main(argv: list[str]) -> int:
    """Entry point of ``kvindex extproc``; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from kvindex_service.log import configure_logging

    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        config = build_config(args)
    except (OSError, ValueError, ValidationError) as exc:
        parser.print_usage()
        print(f"kvindex extproc: error: {exc}")
        return 2
    if not config.endpoints:
        log.warning("no --endpoint given: only requests with an Envoy subset hint can be routed")
    try:
        asyncio.run(_serve(config, args.host, args.port, args.grace))
    except OSError as exc:
        log.error("cannot start the picker: %s", exc)
        return 1
    return 0
