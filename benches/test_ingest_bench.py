"""Event ingestion throughput, measured not asserted.

- decode+apply: ``Indexer.apply`` on pre-encoded vLLM batches (caller's thread), and
  ``submit`` + ``flush`` (the shard workers), per block-key algorithm;
- end to end: ``benches/ingest_publisher.py`` in its own process publishing over real ZMQ TCP
  into a ``Subscriber`` bound on loopback, until its time is up; blocks/s counted by the core.

Results (medians over rounds) go to benches/out/ingest.json and are printed.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benches.conftest import write_result
from benches.ingest_publisher import MODEL, make_batches
from kvindex_service import Indexer
from kvindex_service.events import Subscriber

PUBLISHER = Path(__file__).with_name("ingest_publisher.py")
POOL = 2000
PODS = [f"10.1.0.{i}:8000" for i in range(4)]
ROUNDS = 3
E2E_SECONDS = 3.0

_batches: dict[str, tuple[list[tuple[str, int, bytes]], int]] = {}


def _pool(algorithm: str) -> tuple[list[tuple[str, int, bytes]], int]:
    """(pod, seq, payload) for POOL batches, one chained stream per pod, interleaved."""
    if algorithm not in _batches:
        streams = [make_batches(POOL // len(PODS), algorithm=algorithm, seed=i) for i in range(len(PODS))]
        batches = [(PODS[p], seq, streams[p][0][seq]) for seq in range(POOL // len(PODS)) for p in range(len(PODS))]
        _batches[algorithm] = (batches, sum(blocks for _, blocks in streams))
    return _batches[algorithm]


def _report(name: str, rates: list[float], extra: dict[str, Any] | None = None) -> None:
    median = statistics.median(rates)
    data = {f"{name}/blocks_per_s": median, f"{name}/rounds": [round(r) for r in rates]}
    data.update({f"{name}/{k}": v for k, v in (extra or {}).items()})
    write_result("ingest", data)
    print(
        f"\n{name}: median {median / 1e6:.2f} M blocks/s over {len(rates)} rounds "
        f"({', '.join(f'{r / 1e6:.2f}' for r in rates)}) {extra or ''}"
    )


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "xxh3"])
def test_decode_apply(benchmark: Any, algorithm: str) -> None:
    """One thread: decode + key computation + index update, no queues."""
    payloads, blocks = _pool(algorithm)
    rates: list[float] = []

    def setup() -> tuple[tuple[Indexer], dict[str, Any]]:
        return (Indexer(hash_seed="42", algorithm=algorithm, shards=1),), {}

    def run(ix: Indexer) -> None:
        t = time.perf_counter()
        for pod, seq, payload in payloads:
            ix.apply(pod, MODEL, payload, seq=seq)
        rates.append(blocks / (time.perf_counter() - t))
        assert ix.counters()["blocks_stored"] == blocks
        ix.close()

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    _report(f"apply/{algorithm}", rates)


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "xxh3"])
def test_submit_flush(benchmark: Any, algorithm: str) -> None:
    """The shard path: submit every batch (4 pods over the default shard count), then flush."""
    payloads, blocks = _pool(algorithm)
    rates: list[float] = []

    def setup() -> tuple[tuple[Indexer], dict[str, Any]]:
        return (Indexer(hash_seed="42", algorithm=algorithm),), {}

    def run(ix: Indexer) -> None:
        t = time.perf_counter()
        for pod, seq, payload in payloads:
            ix.submit(pod, MODEL, seq, payload)
        assert ix.flush(60)
        rates.append(blocks / (time.perf_counter() - t))
        assert ix.counters()["blocks_stored"] == blocks
        ix.close()

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    _report(f"submit_flush/{algorithm}", rates, {"shards": Indexer().shards})


@pytest.mark.parametrize("algorithm", ["sha256_cbor", "xxh3"])
def test_end_to_end(benchmark: Any, algorithm: str) -> None:
    """Publisher process -> ZMQ TCP loopback -> Subscriber -> shards -> index."""
    rates: list[float] = []
    info: dict[str, Any] = {}

    def run() -> None:
        ix = Indexer(hash_seed="42", algorithm=algorithm)
        # the bench publishes 10.1.0.x pods from loopback
        sub = Subscriber(ix, bind="tcp://127.0.0.1:*", verify_peer=False)
        sub.start()
        proc = None
        try:
            assert sub.bound_endpoint is not None
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(PUBLISHER),
                    "--connect",
                    sub.bound_endpoint,
                    "--duration",
                    str(E2E_SECONDS),
                    "--pool",
                    str(POOL),
                    "--algorithm",
                    algorithm,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while sub.stats()["messages_received"] == 0:
                assert time.monotonic() < deadline, "publisher never started"
                time.sleep(0.001)
            t0 = time.perf_counter()
            c0 = ix.counters()["blocks_stored"]
            out, _ = proc.communicate(timeout=120)
            # Everything the publisher sent has reached our socket once it has exited
            # (its linger flushes the queue): wait until all of it is received and applied.
            sent = json.loads(out)
            while sub.stats()["messages_received"] < sent["batches"]:
                assert time.monotonic() < deadline + 120, "batches lost"
                time.sleep(0.001)
            assert sub.sync(60)
            elapsed = time.perf_counter() - t0
            applied = ix.counters()["blocks_stored"] - c0
            rates.append(applied / elapsed)
            stats = sub.stats()
            info.update(
                batches=sent["batches"],
                publisher_blocks_per_s=round(sent["blocks"] / sent["seconds"]),
                gaps=stats["gaps"],
                pushbacks=stats["pushbacks"],
            )
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            sub.stop()
            ix.close()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _report(f"end_to_end/{algorithm}", rates, info)
