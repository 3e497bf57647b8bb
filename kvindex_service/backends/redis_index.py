"""The block index in Redis / Valkey, shared by every replica that names the same server.

Layout (``P`` is the key prefix, ``T`` a model's hash tag ``{P:<12 hex of SHA-1(model)>}``, so a
cluster keeps all of one model's keys in one slot and a lookup is one script call):

- ``T:b`` + 8 key bytes (big-endian): a hash per block key; one field ``<pod>\\x1f<tier>`` (empty
  value) per entry. Setting a field twice is a no-op, so any number of replicas may ingest the
  same streams: adds and removes are idempotent per (key, pod, tier).
- ``T:p:<pod>``: a set of ``<8 key bytes><tier>``, the pod's entries under that model, so a
  pod clear pops its own entries in chunks (no ``KEYS``/``SCAN`` of the keyspace).
- ``P:pm:<pod>``: the model tags a pod has stored under; ``P:pods``: the pods seen.

Round trips: one ``EVALSHA`` per event batch (a batch with ``AllBlocksCleared`` adds one for
the pod's models, then one per 1,000 entries cleared), one ``EVALSHA`` per score; the score script
stops reading keys once no pod can extend its prefix. The scores themselves come from the core
(``score_packed``), so they follow exactly the rules of the in-memory index.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from kvindex_service._native import RecordDecoder, ScoreResult, TokenProcessor, score_entries, score_packed
from kvindex_service.backends.url import BackendURL

__all__ = ["BackendError", "RedisIndex"]

_SEP = "\x1f"
_CLEAR_CHUNK = 1000
_WRITE_TIMEOUT = 2.0

# KEYS[1] pod set, KEYS[2..] block keys; ARGV pod, ttl ms (0: none), cap, then (op, tier, n)*
_APPLY = """
local pod, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ps, ki, ai = KEYS[1], 2, 4
local added, removed, refused = 0, 0, 0
while ai <= #ARGV do
  local op, tier, n = ARGV[ai], ARGV[ai + 1], tonumber(ARGV[ai + 2])
  ai = ai + 3
  local field = pod .. '\\31' .. tier
  for _ = 1, n do
    local k = KEYS[ki]
    ki = ki + 1
    local member = string.sub(k, -8) .. tier
    if op == 's' then
      if redis.call('HEXISTS', k, field) == 0 then
        if cap > 0 and redis.call('HLEN', k) >= cap then
          refused = refused + 1
        else
          redis.call('HSET', k, field, '')
          redis.call('SADD', ps, member)
          added = added + 1
        end
      end
      if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
    else
      if redis.call('HDEL', k, field) == 1 then removed = removed + 1 end
      redis.call('SREM', ps, member)
    end
  end
end
if ttl > 0 and added > 0 then redis.call('PEXPIRE', ps, ttl) end
return {added, removed, refused}
"""

# KEYS[1] pod set; ARGV pod, block-key prefix, chunk. Pops up to `chunk` entries.
_CLEAR = """
local pod, prefix = ARGV[1], ARGV[2]
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[3]))
for _, m in ipairs(members) do
  redis.call('HDEL', prefix .. string.sub(m, 1, 8), pod .. '\\31' .. string.sub(m, 9))
end
return #members
"""

# KEYS block keys in prompt order; ARGV candidate pods (none: all). Per key its fields joined
# by 0x1e (one reply string per key), while at least one pod holding block 0 (and a
# candidate) still holds every block so far.
_LOOKUP = """
local filter = nil
if #ARGV > 0 then
  filter = {}
  for _, p in ipairs(ARGV) do filter[p] = true end
end
local alive, out = {}, {}
for i, k in ipairs(KEYS) do
  local fields = redis.call('HKEYS', k)
  local any = false
  for _, f in ipairs(fields) do
    local cut = string.find(f, '\\31', 1, true)
    if cut then
      local p = string.sub(f, 1, cut - 1)
      if (i == 1 and (filter == nil or filter[p])) or alive[p] == i - 1 then
        alive[p] = i
        any = true
      end
    end
  end
  if not any then break end
  out[i] = table.concat(fields, '\\30')
end
return out
"""


class BackendError(RuntimeError):
    """The shared index could not be reached or answered an error (the cause is chained)."""


def _client(url: BackendURL, timeout: float) -> Any:
    common: dict[str, Any] = {
        "host": url.host,
        "port": url.port,
        "username": url.username,
        "password": url.password,
        "ssl": url.tls,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # no hidden retries: the writer retries with its own backoff, a score degrades at once
        "retry": Retry(NoBackoff(), 0),
    }
    if url.cluster:
        return RedisCluster(**common)
    return redis.Redis(db=url.db, **common)


class RedisIndex:
    """The ``BlockIndex`` contract over one Redis / Valkey server or cluster.

    ``timeout`` bounds every command (a slow server is an error, not a stall). Errors raise
    ``BackendError``; callers decide whether to retry (ingest) or degrade (scoring).
    """

    def __init__(
        self,
        url: BackendURL,
        *,
        block_size: int = 16,
        hash_seed: str | None = None,
        algorithm: str = "sha256_cbor",
        tier_weights: Mapping[str, float] | None = None,
        max_pods_per_key: int = 64,
        ttl: float = 0.0,
        timeout: float = 0.05,
        prefix: str = "kvi",
        max_known: int = 1_000_000,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.block_size = block_size
        self.tier_weights = dict(tier_weights) if tier_weights else None
        self.max_pods_per_key = max_pods_per_key
        self.ttl_ms = int(ttl * 1000)
        self.tp = TokenProcessor(block_size, hash_seed, algorithm)
        self.decoder = RecordDecoder(
            block_size=block_size, hash_seed=hash_seed, algorithm=algorithm, max_known=max_known
        )
        self.client = _client(url, timeout)
        # writes (whole batches, pod clears) get a longer deadline than a /score lookup
        self.writer = _client(url, max(timeout, _WRITE_TIMEOUT))
        self._apply = self.writer.register_script(_APPLY)
        self._clear = self.writer.register_script(_CLEAR)
        self._lookup = self.client.register_script(_LOOKUP)
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # -- naming --------------------------------------------------------------------------
    def tag(self, model: str) -> str:
        return "{" + self.prefix + ":" + hashlib.sha1(model.encode("utf-8")).hexdigest()[:12] + "}"

    def _block_prefix(self, tag: str) -> bytes:
        return (tag + ":b").encode()

    def _keys(self, tag: str, keys: Sequence[int]) -> list[bytes]:
        pre = self._block_prefix(tag)
        return [pre + struct.pack(">Q", k) for k in keys]

    def _pod_set(self, tag: str, pod: str) -> str:
        return f"{tag}:p:{pod}"

    # -- calls ---------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise BackendError(f"{self.url.redacted()}: {exc}") from exc

    def ping(self) -> None:
        self._call(self.client.ping)

    # -- write path ----------------------------------------------------------------------
    def _note(self, pod: str, model: str, tag: str) -> None:
        """Register the pod and its model tag once per process (the sets are idempotent)."""
        if (pod, tag) in self._seen:
            return
        pipe = self.writer.pipeline(transaction=False)
        pipe.sadd(f"{self.prefix}:pm:{pod}", tag)
        pipe.sadd(f"{self.prefix}:pods", pod)
        self._call(pipe.execute)
        with self._lock:
            self._seen.add((pod, tag))

    def apply_records(self, pod: str, model: str, records: Sequence[tuple[str, str, Sequence[int]]]) -> list[int]:
        """Apply decoded records in order; [added, removed, refused] entries. Pod and tier
        names may not contain the separators 0x1e / 0x1f (ValueError)."""
        if _SEP in pod or "\x1e" in pod:
            raise ValueError(f"pod name {pod!r} contains a 0x1e/0x1f separator")
        records = [r for r in records if _SEP not in r[1] and "\x1e" not in r[1]]
        tag = self.tag(model)
        total = [0, 0, 0]
        keys: list[bytes] = []
        args: list[Any] = []

        def flush() -> None:
            if not args:
                return
            self._note(pod, model, tag)
            r = self._call(
                self._apply,
                keys=[self._pod_set(tag, pod), *keys],
                args=[pod, self.ttl_ms, self.max_pods_per_key, *args],
            )
            for i in range(3):
                total[i] += int(r[i])
            keys.clear()
            args.clear()

        for op, tier, ks in records:
            if op == "clear":
                flush()
                self.clear_pod(pod)
                continue
            if not ks:
                continue
            keys.extend(self._keys(tag, ks))
            args.extend(("s" if op == "store" else "r", tier, len(ks)))
        flush()
        return total

    def apply_batch(self, pod: str, model: str, payload: bytes) -> dict[str, int]:
        """Decode one msgpack batch with the core and apply it: one round trip (plus the
        pod's clears when the batch carries ``AllBlocksCleared``)."""
        records, counts = self.decoder.decode(model, payload)
        added, removed, refused = self.apply_records(pod, model, records)
        return {**counts, "added": added, "removed": removed, "refused": refused}

    def add(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None:
        self.apply_records(pod, model, [("store", tier.strip().upper(), keys)])

    def remove(self, pod: str, model: str, keys: Sequence[int], tier: str = "GPU") -> None:
        self.apply_records(pod, model, [("remove", tier.strip().upper(), keys)])

    def clear_pod(self, pod: str) -> int:
        """Drop every entry of the pod (all models, all tiers); returns the entries popped."""
        tags = self._call(self.writer.smembers, f"{self.prefix}:pm:{pod}")
        n = 0
        for raw in tags:
            tag = raw.decode() if isinstance(raw, bytes) else str(raw)
            pre = self._block_prefix(tag)
            while True:
                got = int(self._call(self._clear, keys=[self._pod_set(tag, pod)], args=[pod, pre, _CLEAR_CHUNK]))
                n += got
                if got < _CLEAR_CHUNK:
                    break
        return n

    def remove_pod(self, pod: str) -> None:
        self.clear_pod(pod)
        pipe = self.writer.pipeline(transaction=False)
        pipe.delete(f"{self.prefix}:pm:{pod}")
        pipe.srem(f"{self.prefix}:pods", pod)
        self._call(pipe.execute)
        with self._lock:
            self._seen = {s for s in self._seen if s[0] != pod}

    # -- read path -----------------------------------------------------------------------
    def _fetch(self, model: str, keys: Sequence[int], pods: Sequence[str] | None) -> list[bytes]:
        """Per key (block order, stopping where no pod goes on), its packed fields."""
        if not keys:
            return []
        packed: list[bytes] = self._call(self._lookup, keys=self._keys(self.tag(model), keys), args=list(pods or ()))
        return packed

    def _scored(self, packed: list[bytes], blocks: int, tokens: int, pods: Sequence[str] | None) -> ScoreResult:
        return score_packed(
            packed,
            block_size=self.block_size,
            total_blocks=blocks,
            total_tokens=tokens,
            tier_weights=self.tier_weights,
            pods=list(pods) if pods is not None else None,
        )

    def score_keys(self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None) -> ScoreResult:
        return self._scored(self._fetch(model, keys, pods), len(keys), len(keys) * self.block_size, pods)

    def score(
        self,
        model: str,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        pods: Sequence[str] | None = None,
    ) -> ScoreResult:
        keys = self.tp.block_keys(token_ids, lora_name=lora_name, cache_salt=cache_salt)
        return self._scored(self._fetch(model, keys, pods), len(keys), len(token_ids), pods)

    def ranked(
        self, entries: list[list[tuple[str, str]]], blocks: int, tokens: int, pods: Sequence[str] | None
    ) -> ScoreResult:
        """The core's ranking of fetched entries (also the empty answer of a degraded score)."""
        return score_entries(
            entries,
            block_size=self.block_size,
            total_blocks=blocks,
            total_tokens=tokens,
            tier_weights=self.tier_weights,
            pods=list(pods) if pods is not None else None,
        )

    def lookup(
        self, model: str, keys: Sequence[int], *, pods: Sequence[str] | None = None
    ) -> list[list[tuple[str, str]]]:
        """Per key, the (pod, tier) entries holding it (every key, no early stop)."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for k in self._keys(self.tag(model), keys):
            pipe.hkeys(k)
        want = set(pods) if pods is not None else None
        out = []
        for fields in self._call(pipe.execute):
            per = [tuple(f.decode("utf-8", "replace").rpartition(_SEP)[::2]) for f in fields]
            out.append([(p, t) for p, t in per if want is None or p in want])
        return out

    def stats(self) -> dict[str, Any]:
        """Pods known and the server's memory; counting keys would need a scan, so it is not done."""
        pods = int(self._call(self.client.scard, f"{self.prefix}:pods"))
        mem = self._call(self.client.info, "memory")
        if mem and all(isinstance(v, dict) for v in mem.values()):  # a cluster: one dict per node
            used = sum(int(v.get("used_memory", 0)) for v in mem.values())
        else:
            used = int(mem.get("used_memory", 0))
        return {"pods": pods, "used_memory": used}

    def close(self) -> None:
        for c in (self.client, self.writer):
            try:
                c.close()
            except Exception:  # closing a broken connection must not fail shutdown
                pass
