"""Service configuration: one pydantic-settings model with a nested model per component.

Sources, highest precedence first:

1. explicit overrides (the CLI flags), passed to :func:`load_settings`;
2. environment variables, prefix ``KVINDEX_``, nested fields joined by ``__``
   (``KVINDEX_HTTP__PORT=9000``, ``KVINDEX_ZMQ__BIND=none``,
   ``KVINDEX_TOKENIZERS__SOURCES='{"my/model": "/models/tok"}'``);
3. an optional YAML file (``--config FILE`` or ``KVINDEX_CONFIG``), same nesting;
4. the defaults below.

Nothing is read or created at import time: :func:`load_settings` does the reading, and the
Llama 3.2 tokenizer look-up happens only when :meth:`TokenizerSettings.effective_sources`
is called (by the runtime, at start).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from kvindex_service._native import index_defaults

__all__ = [
    "LLAMA32_MODELS",
    "DiscoverySettings",
    "HttpSettings",
    "IndexSettings",
    "LogSettings",
    "PodConfig",
    "Settings",
    "SnapshotSettings",
    "TokenizerSettings",
    "ZmqSettings",
    "deep_merge",
    "load_settings",
]

#: Model names served with the Llama 3.2 tokenizer shipped in the venv when nothing else is
#: configured for them (the vLLM captures in tests/fixtures use the 3B model).
LLAMA32_MODELS: tuple[str, ...] = (
    "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.2-3B-Instruct",
)

_DISABLED = {"", "none", "null", "off", "false", "disabled"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HttpSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    request_timeout: float = Field(default=30.0, gt=0, description="seconds per request, then 504")
    gil_switch_interval: float = Field(
        default=0.0005,
        gt=0,
        le=0.1,
        description="sys.setswitchinterval while serving (s): how long /score may wait for the GIL",
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="when set, every route but /healthz and /readyz needs 'Authorization: Bearer <token>'",
    )
    tls_cert: str | None = Field(default=None, description="PEM certificate (chain) file: serve HTTPS")
    tls_key: str | None = Field(default=None, description="PEM private key file for tls_cert")

    @field_validator("auth_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


class PodConfig(_Section):
    """One vLLM publisher to connect to (connect mode)."""

    endpoint: str
    pod_id: str | None = None
    replay_endpoint: str | None = None


class ZmqSettings(_Section):
    bind: str | None = Field(
        default="tcp://0.0.0.0:5557",
        description="SUB endpoint every pod connects to; null disables bind mode",
    )
    pods: list[PodConfig] = Field(default_factory=list)
    topic_prefix: str = "kv@"
    rcvhwm: int = Field(default=100_000, ge=1)
    replay_timeout: float = Field(default=1.0, gt=0)
    replay_retries: int = Field(default=3, ge=0)
    replay_backoff: float = Field(default=0.1, ge=0)
    reconnect_ivl: float = Field(default=0.1, gt=0, description="seconds before a dropped link is dialled again")
    reconnect_ivl_max: float = Field(
        default=5.0, gt=0, description="cap of the doubling reconnect backoff (s; >= reconnect_ivl, checked at start)"
    )
    max_pods: int = Field(
        default=1024, ge=1, description="pods in total: bind-mode topics, configured pods and POST /pods"
    )
    pod_idle_timeout: float | None = Field(
        default=None, gt=0, description="forget bind-mode pods silent this long (s); null = never"
    )
    verify_peer: bool = Field(
        default=True, description="bind mode: a topic naming pod IP:port is accepted only from that IP"
    )
    allowed_publishers: list[str] = Field(
        default_factory=list, description="CIDRs that may publish pod ids that are not IP:port; empty = any"
    )
    connect_allow: list[str] = Field(default_factory=list, description="CIDRs POST /pods may connect to; empty = any")
    pod_batch_rate: float = Field(
        default=0.0, ge=0, description="batches/s one pod may hand to the index; past it, push-back (0 = unbounded)"
    )

    @field_validator("bind", "pod_idle_timeout", mode="before")
    @classmethod
    def _disable_bind(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _DISABLED:
            return None
        return value

    @field_validator("allowed_publishers", "connect_allow")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        from kvindex_service.events.admission import parse_networks

        parse_networks(value)  # ValueError naming the bad entry
        return value


_INDEX = index_defaults()  # the core declares the index defaults; a dict of constants


class IndexSettings(_Section):
    block_size: int = Field(default=_INDEX["block_size"], ge=1)
    hash_seed: str | None = Field(default=_INDEX["hash_seed"], description="vLLM's PYTHONHASHSEED")
    hash_algo: str = _INDEX["algorithm"]
    max_keys: int = Field(default=_INDEX["max_keys"], ge=1)
    max_pods_per_key: int = Field(default=_INDEX["max_pods_per_key"], ge=1)
    shards: int = Field(default=_INDEX["shards"], ge=0, description="0 = one per CPU core")
    queue_capacity: int = Field(default=_INDEX["queue_capacity"], ge=1)
    tier_weights: dict[str, float] = Field(default_factory=lambda: dict(_INDEX["tier_weights"]))
    key_memo: int = Field(
        default=_INDEX["key_memo"], ge=0, description="blocks the read path remembers to skip SHA-256 (0 = off)"
    )
    max_tiers_per_pod: int = Field(
        default=_INDEX["max_tiers_per_pod"],
        ge=1,
        le=16,
        description="tier names besides the built-in and weighted ones one pod may use at once",
    )
    backend: str = Field(
        default="memory",
        description="memory, or a shared index: redis://host:port/db, rediss://, valkey://, redis+cluster://",
    )
    backend_timeout: float = Field(default=0.05, gt=0, description="shared index: deadline of one /score lookup (s)")
    backend_ttl: float = Field(
        default=0,
        ge=0,
        description="shared index: a block key expires this long after its last store (s); 0 = never (use maxmemory-policy)",
    )
    backend_buffer: int = Field(
        default=10_000,
        ge=1,
        description="shared index: event batches held while it is unreachable, then dropped (counted)",
    )

    @field_validator("backend")
    @classmethod
    def _backend_url(cls, value: str) -> str:
        from kvindex_service.backends.url import parse_backend

        parse_backend(value)  # raises ValueError naming the problem
        return value

    @field_validator("hash_seed", mode="before")
    @classmethod
    def _seed_as_str(cls, value: Any) -> Any:
        # YAML and env both like to turn "42" into an int; vLLM's seed is a string.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TokenizerSettings(_Section):
    sources: dict[str, str] = Field(
        default_factory=dict, description="model -> tokenizer dir, tokenizer.json or HF repo id"
    )
    chat_templates: dict[str, str] = Field(default_factory=dict, description="model -> file")
    mode: Literal["exact", "fast"] = Field(
        default="exact",
        description="exact: prefix-store reuse only at provably safe cuts; fast: looser reuse",
    )
    prefix_store_chars: int = Field(default=64_000_000, ge=0)
    chunk_chars: int = Field(default=256, ge=1)
    max_workers: int = Field(default=4, ge=1)
    max_messages: int = Field(default=4096, ge=1, description="chat messages per request, else 413")
    max_prompt_chars: int = Field(
        default=2_000_000, ge=1, description="characters of a prompt or rendered chat per request, else 413"
    )
    hf_cache: str | None = None
    llama32_defaults: bool = Field(
        default=True, description="serve the Llama 3.2 model names with the bundled tokenizer"
    )

    def effective_sources(self) -> dict[str, str]:
        """Configured sources plus the bundled Llama 3.2 tokenizer for the Llama 3.2 model
        names the user left unconfigured (only if the tokenizer package is installed)."""
        sources = dict(self.sources)
        if self.llama32_defaults and any(m not in sources for m in LLAMA32_MODELS):
            from kvindex_service.tokenization import find_llama3_tokenizer_dir

            path = find_llama3_tokenizer_dir()
            if path is not None:
                for model in LLAMA32_MODELS:
                    sources.setdefault(model, path)
        return sources


class SnapshotSettings(_Section):
    """Warm restart (``kvindex_service.snapshot``): load the index at start, save it on exit."""

    file: str | None = Field(
        default=None,
        description="load this snapshot at start (missing: cold start) and write it atomically at "
        "shutdown and every interval",
    )
    warm_from: str | None = Field(
        default=None, description="a peer replica's base URL: load its GET /snapshot before subscribing"
    )
    interval: float = Field(
        default=300.0, ge=0, description="seconds between periodic writes of file; 0 = at shutdown only"
    )
    warm_timeout: float = Field(default=120.0, gt=0, description="seconds allowed for fetching the peer's snapshot")

    @field_validator("file", "warm_from", mode="before")
    @classmethod
    def _unset(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _DISABLED:
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("warm_from")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("warm_from must be an http:// or https:// base URL")
        return value.rstrip("/") if value is not None else None


class LogSettings(_Section):
    level: str = "INFO"
    json_: bool = Field(default=False, alias="json", description="one JSON object per line")

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError(f"unknown log level {value!r}")
        return level


class DiscoverySettings(_Section):
    """Kubernetes pod discovery (``kvindex serve --discover``): connect to every Ready pod the
    label selector finds."""

    enabled: bool = Field(default=False, description="watch pods and subscribe to the Ready ones")
    namespace: str | None = Field(
        default=None, description="default: the pod's own namespace in a cluster, else the kubeconfig context's"
    )
    label_selector: str | None = Field(default=None, description="e.g. app=vllm; required when enabled")
    kubeconfig: str | None = Field(
        default=None, description="kubeconfig file; default: in-cluster service account, else $KUBECONFIG"
    )
    zmq_port: int = Field(default=5557, ge=1, le=65535, description="vLLM's PUB port (rank N: zmq_port + N)")
    replay_port: int | None = Field(
        default=None, ge=1, le=65535, description="vLLM's replay ROUTER port (rank N: + N); null = none"
    )
    pod_port: int = Field(default=8000, ge=1, le=65535, description="pod id = podIP:pod_port (rank N: + N)")
    dp_size: int = Field(default=1, ge=1, le=256, description="data-parallel ranks per pod")
    unready_grace: float = Field(
        default=30.0, ge=0, description="seconds a subscribed pod may stay unready before it is dropped"
    )
    watch_timeout: int = Field(default=300, ge=1, description="seconds per watch request before it is renewed")

    @field_validator("label_selector", "namespace", "kubeconfig", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _selector_required(self) -> DiscoverySettings:
        if self.enabled and self.label_selector is None:
            raise ValueError("discovery.label_selector is required when discovery is enabled")
        return self


class Settings(BaseSettings):
    """The whole service configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="KVINDEX_",
        env_nested_delimiter="__",
        extra="forbid",
        populate_by_name=True,
    )

    http: HttpSettings = Field(default_factory=lambda: HttpSettings())
    zmq: ZmqSettings = Field(default_factory=lambda: ZmqSettings())
    index: IndexSettings = Field(default_factory=lambda: IndexSettings())
    tokenizers: TokenizerSettings = Field(default_factory=lambda: TokenizerSettings())
    log: LogSettings = Field(default_factory=lambda: LogSettings())
    discovery: DiscoverySettings = Field(default_factory=lambda: DiscoverySettings())
    snapshot: SnapshotSettings = Field(default_factory=lambda: SnapshotSettings())


def deep_merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested mappings; later layers win, dicts are merged key by key, lists replaced."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = deep_merge(out[key], value)
            elif isinstance(value, Mapping):
                out[key] = deep_merge(value)
            else:
                out[key] = value
    return out


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: top level must be a mapping")
    return data


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` with precedence overrides > environment > YAML > defaults.

    ``config_file`` defaults to ``$KVINDEX_CONFIG``. ``overrides`` is a nested mapping shaped
    like the settings (the CLI builds it from its flags). Raises
    :class:`pydantic.ValidationError`, :class:`OSError` (unreadable file) or
    :class:`ValueError` (the YAML is not a mapping).
    """
    path = config_file if config_file is not None else os.environ.get("KVINDEX_CONFIG") or None
    file_layer = _read_yaml(path) if path else {}
    env_layer = EnvSettingsSource(Settings)()
    merged = deep_merge(file_layer, env_layer, overrides or {})
    # pydantic-settings applies the environment once more underneath ``merged`` here; that
    # changes nothing, since ``merged`` already holds every layer in the right order.
    return Settings.model_validate(merged)
