"""``kvindex simulate``: compare routers on one request stream over simulated vLLM pods."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .bounds import reuse_bound
from .engine import FleetConfig, RouterRun, ServiceModel, block_keys_for, simulate
from .report import format_table, router_metrics, write_json, write_plot
from .routers import make_router, router_names
from .workloads import (
    Request,
    TraceError,
    chat_sessions,
    load_mooncake_trace,
    mooncake_requests,
    shared_prefix,
    summarize,
)

__all__ = ["DEFAULT_ROUTERS", "build_parser", "main", "run"]

log = logging.getLogger(__name__)

DEFAULT_ROUTERS = (
    "random",
    "round-robin",
    "session-sticky",
    "least-loaded",
    "kvindex",
    "kvindex-direct",
    "approximate",
    "oracle",
    "oracle-greedy",
)

# Per-workload defaults for flags left unset: (rate, pod capacity in blocks).
_DEFAULTS: dict[str, tuple[float | None, int]] = {
    "shared-prefix": (6.0, 640),
    "chat": (0.5, 2048),
    "trace": (None, 16384),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvindex simulate",
        description="Simulate a fleet of vLLM pods (prefix-caching block pools publishing real "
        "KV events over ZMQ) and compare routers on the same request stream.",
    )
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=sorted(_DEFAULTS), default="shared-prefix")
    w.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace (--workload trace)")
    w.add_argument(
        "--rate",
        type=float,
        help="arrivals/s (chat: new sessions/s; trace: rescale "
        "timestamps to this mean rate). Default: 6 shared-prefix, 0.5 chat, trace as is",
    )
    w.add_argument("--duration", type=float, default=60.0, help="simulated seconds of arrivals")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--groups", type=int, default=12, help="shared-prefix: prefix groups")
    w.add_argument("--prompts-per-group", type=int, default=16)
    w.add_argument(
        "--system-tokens", type=int, help="shared system prompt length (default 2048 shared-prefix, 512 chat)"
    )
    w.add_argument("--question-tokens", type=int, default=128, help="shared-prefix question / chat user message length")
    w.add_argument("--output-tokens", type=int, help="mean output length (default 64 shared-prefix, 128 chat)")
    w.add_argument("--turns", type=int, default=5, help="chat: turns per session")
    w.add_argument("--think-time", type=float, default=8.0, help="chat: mean s between turns")
    w.add_argument("--max-requests", type=int, help="trace: cap on requests replayed")

    f = p.add_argument_group("fleet")
    f.add_argument("--pods", type=int, default=3)
    f.add_argument(
        "--pod-capacity", type=int, help="KV blocks per pod (default 640 shared-prefix, 2048 chat, 16384 trace)"
    )
    f.add_argument("--block-size", type=int, default=16)
    f.add_argument(
        "--picker-load-weight",
        type=float,
        default=None,
        help="kvindex router: the picker's cost of one extra in-flight request (default: the picker's own, 0.1)",
    )
    f.add_argument(
        "--approx-capacity",
        type=int,
        help="approximate router: chunk hashes remembered per pod, in blocks (default: the pod capacity)",
    )
    f.add_argument("--max-running", type=int, default=ServiceModel.max_running)
    f.add_argument("--prefill-ms-per-token", type=float, default=ServiceModel.prefill_s_per_token * 1000)
    f.add_argument("--decode-ms-per-token", type=float, default=ServiceModel.decode_s_per_token * 1000)
    f.add_argument("--hash-seed", help="PYTHONHASHSEED of the simulated vLLM (default: unset)")
    f.add_argument("--model", default=FleetConfig.model)

    o = p.add_argument_group("routers and output")
    o.add_argument(
        "--routers", default=",".join(DEFAULT_ROUTERS), help=f"comma-separated, from: {', '.join(router_names())}"
    )
    o.add_argument("--json", type=Path, help="write the full report as JSON")
    o.add_argument("--plot", type=Path, help="write a PNG plot")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    o.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="run the routers in this many processes (same numbers; no progress bar when > 1)",
    )
    o.add_argument("-v", "--verbose", action="store_true")
    return p


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _requests(args: argparse.Namespace) -> list[Request]:
    if args.workload == "shared-prefix":
        return shared_prefix(
            seed=args.seed,
            rate=args.rate,
            duration=args.duration,
            groups=args.groups,
            prompts_per_group=args.prompts_per_group,
            system_tokens=args.system_tokens if args.system_tokens is not None else 2048,
            question_tokens=args.question_tokens,
            output_tokens=args.output_tokens if args.output_tokens is not None else 64,
        )
    if args.workload == "chat":
        return chat_sessions(
            seed=args.seed,
            rate=args.rate,
            duration=args.duration,
            turns=args.turns,
            system_tokens=args.system_tokens if args.system_tokens is not None else 512,
            user_tokens=args.question_tokens,
            output_tokens=args.output_tokens if args.output_tokens is not None else 128,
            think_time=args.think_time,
        )
    if args.trace is None:
        raise ValueError("--workload trace needs --trace PATH")
    records = load_mooncake_trace(args.trace)
    scale = 1.0
    if args.rate is not None and len(records) > 1:
        span = (max(r.timestamp_ms for r in records) - min(r.timestamp_ms for r in records)) / 1e3
        if span > 0:
            scale = (len(records) / span) / args.rate
    return mooncake_requests(
        records,
        seed=args.seed,
        duration=args.duration,
        time_scale=scale,
        max_requests=args.max_requests,
    )


def _cost(router: str) -> int:
    return 3 if make_router(router, 0).needs_events else 1


def _simulate_group(args: argparse.Namespace, cfg: FleetConfig, routers: list[str]) -> list[RouterRun]:
    """One worker process: rebuild the (deterministic) request list, run its routers."""
    return simulate(_requests(args), cfg, routers, seed=args.seed)


class _Parallel:
    """Routers split over ``--jobs`` spawned processes, started before the parent builds its
    own request list (each worker rebuilds it rather than receiving it pickled); every run is
    deterministic, so the numbers do not change."""

    def __init__(self, args: argparse.Namespace, cfg: FleetConfig, routers: list[str]) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        jobs = min(args.jobs, len(routers))
        # Longest first onto the least busy process; the event-fed routers (real sockets,
        # the real picker) cost about three of the others.
        groups: list[list[str]] = [[] for _ in range(jobs)]
        busy = [0] * jobs
        for name in sorted(routers, key=lambda n: -_cost(n)):
            i = busy.index(min(busy))
            groups[i].append(name)
            busy[i] += _cost(name)
        self.routers = routers
        self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
        self._futures = [self._pool.submit(_simulate_group, args, cfg, g) for g in groups]

    def result(self) -> list[RouterRun]:
        by_name = {run_.router: run_ for f in self._futures for run_ in f.result()}
        return [by_name[name] for name in self.routers]

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Simulate as the parsed flags say; print the table; return the JSON report."""
    _positive(
        args,
        "pods",
        "pod_capacity",
        "block_size",
        "max_running",
        "duration",
        "rate",
        "groups",
        "prompts_per_group",
        "turns",
        "approx_capacity",
        "jobs",
    )
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    known = router_names()
    unknown = [r for r in routers if r not in known]
    if unknown or not routers:
        raise ValueError(f"unknown router(s) {unknown}; choose from {', '.join(known)}")
    rate_default, cap_default = _DEFAULTS[args.workload]
    if args.rate is None and args.workload != "trace":
        args.rate = rate_default
    capacity = args.pod_capacity if args.pod_capacity is not None else cap_default
    started = time.perf_counter()
    service = ServiceModel(
        prefill_s_per_token=args.prefill_ms_per_token / 1000,
        decode_s_per_token=args.decode_ms_per_token / 1000,
        max_running=args.max_running,
    )
    cfg = FleetConfig(
        pods=args.pods,
        pod_capacity=capacity,
        block_size=args.block_size,
        model=args.model,
        hash_seed=args.hash_seed,
        service=service,
        picker_load_weight=args.picker_load_weight,
        approx_capacity=args.approx_capacity,
    )
    from tqdm import tqdm  # type: ignore[import-untyped]

    parallel = _Parallel(args, cfg, routers) if args.jobs > 1 and len(routers) > 1 else None
    try:
        requests = _requests(args)
        if not requests:
            raise ValueError("the workload produced no requests (duration too short or rate too low)")
        keys = block_keys_for(cfg)
        if parallel is not None:
            runs = parallel.result()
        else:
            show = not args.quiet and sys.stderr.isatty()
            with tqdm(
                total=len(requests) * len(routers), disable=not show, file=sys.stderr, unit="req", desc="simulating"
            ) as bar:
                runs = simulate(requests, cfg, routers, seed=args.seed, on_request=bar.update, keys=keys)
    finally:
        if parallel is not None:
            parallel.close()
    span = max(args.duration, requests[-1].arrival)
    results = {run_.router: router_metrics(run_, span=span) for run_ in runs}
    bound = reuse_bound(requests, keys)
    for m in results.values():
        m["hit_rate_of_bound"] = (
            m["hit_rate"] / bound["hit_rate"] if m["hit_rate"] is not None and bound["hit_rate"] else None
        )
    workload = {"name": args.workload, **summarize(requests), "reuse_bound": bound}
    if args.workload == "trace":
        workload["trace"] = str(args.trace)
    report: dict[str, Any] = {
        "tool": "kvindex simulate",
        "argv": list(argv),
        "seed": args.seed,
        "workload": workload,
        "fleet": {
            "pods": cfg.pods,
            "pod_capacity_blocks": cfg.pod_capacity,
            "block_size": cfg.block_size,
            "model": cfg.model,
            "hash_seed": cfg.hash_seed,
            "max_running": service.max_running,
            "prefill_ms_per_token": args.prefill_ms_per_token,
            "decode_ms_per_token": args.decode_ms_per_token,
            "approx_capacity_blocks": cfg.approx_capacity or cfg.pod_capacity,
        },
        "routers": results,
        "wall_seconds": time.perf_counter() - started,
    }
    w = report["workload"]
    print(
        f"kvindex simulate: {args.workload}, {w['requests']} requests over {args.duration:g} s, "
        f"{cfg.pods} pods x {cfg.pod_capacity} blocks, seed {args.seed}; "
        f"infinite-cache reuse bound {bound['hit_rate'] or 0.0:.1%}"
    )
    print(format_table(results))
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(
            results,
            args.plot,
            title=f"kvindex simulate --workload {args.workload} "
            f"--pods {cfg.pods} --seed {args.seed} ({w['requests']} requests)",
        )
        print(f"wrote {args.plot}")
    return report


def main(argv: list[str]) -> int:
    """Entry point of ``kvindex simulate`` (argv excludes the program and subcommand)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        run(args, argv)
    except (ValueError, TraceError, OSError) as exc:
        print(f"kvindex simulate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
