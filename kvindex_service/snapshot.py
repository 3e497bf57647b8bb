"""Warm restart: load the index from a peer replica or a file at start, save it on the way out.

- ``snapshot.warm_from``: a peer replica's base URL; its ``GET /snapshot`` is streamed to a
  temporary file (with ``Authorization: Bearer <http.auth_token>`` when a token is configured)
  and loaded before the subscriber starts.
- ``snapshot.file``: loaded at start when the peer gave nothing (a missing file is a cold
  start), and written atomically (temporary file, fsync, rename, fsync of the directory) at
  shutdown and every ``snapshot.interval`` seconds.

A snapshot written with another block size, hash algorithm or seed raises
:class:`~kvindex_service._native.SnapshotMismatchError` (the service refuses to start: exit 2);
an unreachable peer or a truncated or corrupt snapshot is logged and the next source is tried,
then the service starts cold. The core never half-loads a snapshot.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvindex_service._native import Indexer, SnapshotError, SnapshotMismatchError
from kvindex_service.config import SnapshotSettings

if TYPE_CHECKING:
    from kvindex_service._native import _SnapshotLoaded

__all__ = ["SnapshotSaver", "check_file", "fetch_peer", "load_at_start", "write_file"]

logger = logging.getLogger(__name__)

#: Bytes read to check a file's header before anything else starts.
_HEADER_PROBE = 64 * 1024


def check_file(indexer: Indexer, path: str) -> None:
    """Refuse a snapshot file of another block size / algorithm / seed now (raises
    ``SnapshotMismatchError``); anything else about the file is dealt with when it loads."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER_PROBE)
    except OSError:
        return
    try:
        indexer.check_snapshot_header(head)
    except SnapshotMismatchError as exc:
        raise SnapshotMismatchError(f"snapshot file {path}: {exc}") from None
    except SnapshotError:
        return  # corrupt or truncated: rejected (and logged) by the load


def fetch_peer(url: str, token: str | None, timeout: float, directory: str | None = None) -> str:
    """Stream ``url/snapshot`` into a temporary file; returns its path (the caller removes it)."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    fd, path = tempfile.mkstemp(prefix="kvindex-warm-", suffix=".snapshot", dir=directory)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            httpx.stream(
                "GET", f"{url}/snapshot", headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0))
            ) as resp,
        ):
            if resp.status_code != 200:
                resp.read()
                raise OSError(f"GET {url}/snapshot answered {resp.status_code}: {resp.text[:200]}")
            for chunk in resp.iter_bytes(1 << 20):
                out.write(chunk)
    except BaseException:
        Path(path).unlink(missing_ok=True)
        raise
    return path


def _load(indexer: Indexer, path: str, source: str) -> _SnapshotLoaded | None:
    t0 = time.perf_counter()
    try:
        loaded = indexer.load_snapshot_file(path)
    except SnapshotMismatchError as exc:
        raise SnapshotMismatchError(f"{source}: {exc}") from None
    except SnapshotError as exc:
        logger.error("snapshot rejected, not loaded: %s: %s", source, exc)
        return None
    logger.info(
        "snapshot loaded from %s",
        source,
        extra={"source": source, "seconds": round(time.perf_counter() - t0, 3), **loaded},
    )
    return loaded


def load_at_start(indexer: Indexer, settings: SnapshotSettings, token: str | None) -> _SnapshotLoaded | None:
    """The peer's snapshot, else the file's, else None (cold start). Raises only
    ``SnapshotMismatchError``."""
    if settings.warm_from is not None:
        source = f"peer {settings.warm_from}"
        try:
            path = fetch_peer(settings.warm_from, token, settings.warm_timeout)
        except Exception as exc:
            logger.warning("cannot fetch the snapshot of %s: %s", source, exc)
        else:
            try:
                loaded = _load(indexer, path, source)
            finally:
                Path(path).unlink(missing_ok=True)
            if loaded is not None:
                return loaded
    if settings.file is not None:
        if not os.path.exists(settings.file):
            logger.info("no snapshot file at %s: cold start", settings.file)
            return None
        try:
            return _load(indexer, settings.file, f"file {settings.file}")
        except OSError as exc:
            logger.error("cannot read snapshot file %s: %s", settings.file, exc)
    return None


def write_file(indexer: Indexer, path: str) -> dict[str, Any]:
    """Write a snapshot to ``path`` atomically; returns its size, keys, time and longest shard
    lock hold."""
    target = Path(path)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        stream = indexer.snapshot()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in stream:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return {
        "bytes": size,
        "keys": stream.keys,
        "seconds": round(time.perf_counter() - t0, 3),
        "max_lock_hold_ms": round(stream.max_lock_hold * 1000, 3),
    }


class SnapshotSaver:
    """Writes ``path`` every ``interval`` seconds (0: never) on a background thread, and once
    more when stopped; one write at a time."""

    def __init__(self, indexer: Indexer, path: str, interval: float) -> None:
        self._indexer = indexer
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._interval > 0:
            self._thread = threading.Thread(target=self._run, name="kvindex-snapshot", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.save("periodic")

    def save(self, why: str) -> bool:
        with self._write_lock:
            try:
                info = write_file(self._indexer, self._path)
            except Exception as exc:
                logger.error("cannot write snapshot %s: %s", self._path, exc)
                return False
        logger.info("snapshot written to %s (%s)", self._path, why, extra={"path": self._path, **info})
        return True

    def stop(self, timeout: float) -> None:
        """Stop the periodic writes (a write in progress finishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
