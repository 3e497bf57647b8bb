"""Open-loop HTTP load on loopback: a fixed request rate, latency measured from the moment
each request was *due*, so a slow server cannot hide its queueing (no coordinated omission).

Raw asyncio streams with pre-rendered HTTP/1.1 requests on keep-alive connections: the
client's own cost per request is a few microseconds, far below an HTTP client library's,
so the numbers describe the server. A request waits for an idle connection when all are busy;
that wait counts in its latency, as it would for a real caller.

    python -m benches.http_load http://127.0.0.1:8080/score body.json --rate 500 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["LoadResult", "render_post", "run_open_loop"]


def render_post(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class LoadResult:
    rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_s: list[float] = field(default_factory=list)
    dues_s: list[float] = field(default_factory=list)
    """When each latency's request was due (``loop.time()``, i.e. ``time.monotonic()``)."""
    elapsed_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float:
            if not lat:
                return float("nan")
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

        return {
            "target_rate_rps": self.rate,
            "achieved_rps": round(self.ok / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "requests": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_ms": round(pct(0.50), 3),
            "p90_ms": round(pct(0.90), 3),
            "p99_ms": round(pct(0.99), 3),
            "max_ms": round(lat[-1] * 1000, 3) if lat else float("nan"),
            "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else float("nan"),
        }


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def run_open_loop(
    url: str,
    bodies: Sequence[bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 32,
    warmup: float = 1.0,
) -> LoadResult:
    """POST ``bodies`` (round robin) to ``url`` at ``rate`` requests/s for ``duration`` s
    after ``warmup`` s whose requests are not recorded."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    raws = [render_post(host, port, path, b) for b in bodies]
    pool: asyncio.Queue[_Conn] = asyncio.Queue()
    conns = []
    for _ in range(connections):
        reader, writer = await asyncio.open_connection(host, port)
        conn = _Conn(reader, writer)
        conns.append(conn)
        pool.put_nowait(conn)

    result = LoadResult(rate=rate, duration_s=duration)
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    total = int((warmup + duration) * rate)
    n_warm = int(warmup * rate)
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, due: float) -> None:
        conn = await pool.get()
        try:
            status, _ = await conn.request(raws[i % len(raws)])
        except (OSError, asyncio.IncompleteReadError, ValueError):
            if i >= n_warm:
                result.errors += 1
            return  # the connection is dropped
        done = loop.time()
        pool.put_nowait(conn)
        if i < n_warm:
            return
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.ok += 1
            result.latencies_s.append(done - due)
            result.dues_s.append(due)
        else:
            result.errors += 1

    start = loop.time() + 0.05
    measured_start = start + n_warm * interval
    for i in range(total):
        due = start + i * interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if i >= n_warm:
            result.sent += 1
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    result.elapsed_s = loop.time() - measured_start
    for conn in conns:
        await conn.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("body", type=Path, help="a JSON file: one body, or a list of bodies")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    data = json.loads(args.body.read_text())
    bodies = [json.dumps(b).encode() for b in (data if isinstance(data, list) else [data])]
    res = asyncio.run(
        run_open_loop(args.url, bodies, rate=args.rate, duration=args.duration, connections=args.connections)
    )
    print(json.dumps(res.summary(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
