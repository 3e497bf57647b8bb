"""Configuration of the endpoint picker.

One pydantic model, independent of the Envoy body mode: the picker learns the mode of every
stream from the ``protocol_config`` Envoy puts in the stream's first message, so the same
picker serves listeners configured BUFFERED, STREAMED or FULL_DUPLEX_STREAMED.

The policy defaults are explained in ``docs/extproc.md`` ("Default policy and why"); the
short version is on each field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvindex_service.extproc.hints import HintError, canonical_endpoint

__all__ = ["DEFAULT_SESSION_HEADER", "ExtprocConfig", "PolicyWeights", "parse_endpoint"]

DEFAULT_SESSION_HEADER = "x-session-id"


def parse_endpoint(value: str) -> tuple[str, int]:
    """Split ``ip:port`` (``[v6]:port`` for IPv6) and check both halves.

    Envoy's ORIGINAL_DST cluster connects to the literal address in the header, so a host
    name would not be resolved there: only IP literals are accepted (the same rule as for
    subset-hint entries, see :mod:`.hints`).
    """
    try:
        ep = canonical_endpoint(value)
    except HintError as exc:
        raise ValueError(f"endpoint {exc}") from None
    host, _, port = ep.rpartition(":")
    return host.strip("[]"), int(port)


class PolicyWeights(BaseModel):
    """Weights of the utility ``kv * weighted_prefix - load * extra_inflight``.

    ``weighted_prefix`` is the tier-weighted share of the prompt's full blocks an endpoint
    already holds (0..1); ``extra_inflight`` is how many more requests the endpoint has in
    flight than the least loaded eligible endpoint. With the defaults, one extra in-flight
    request costs as much as a tenth of the prompt: an endpoint holding the whole prompt
    keeps winning until it runs ten requests more than an idle peer, then traffic spills
    (chosen from `kvindex simulate` runs; see the README's simulator section).
    """

    model_config = ConfigDict(extra="forbid")

    kv: float = Field(1.0, ge=0.0, description="weight of the cached weighted prefix")
    load: float = Field(0.1, ge=0.0, description="cost of one extra in-flight request")


class ExtprocConfig(BaseModel):
    """Everything the picker needs; all fields have working defaults except the endpoints
    (which may also come per request from Envoy's subset hint)."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[str] = Field(
        default_factory=list,
        description="eligible ip:port endpoints when Envoy sends no subset hint",
    )
    scorer_url: str | None = Field(None, description="base URL of the scoring service (POST {url}/score); None = no KV")
    timeout_ms: float = Field(
        50.0,
        gt=0,
        description="scorer deadline; past it the pick is made by load and affinity",
    )
    session_header: str = Field(DEFAULT_SESSION_HEADER, min_length=1)
    weights: PolicyWeights = Field(default_factory=lambda: PolicyWeights.model_validate({}))
    affinity_margin: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="weighted prefix another endpoint must hold beyond the session's own "
        "endpoint to pull the session away",
    )
    affinity_max_load_gap: int = Field(
        4,
        ge=0,
        description="a session leaves its endpoint when that endpoint has this many more "
        "in-flight requests than the least loaded eligible one",
    )
    max_sessions: int = Field(100_000, ge=0, description="session table bound (LRU)")
    session_ttl_s: float = Field(900.0, gt=0, description="idle sessions are forgotten")
    max_inflight: int | None = Field(
        None,
        ge=1,
        description="per-endpoint in-flight cap: endpoints at the cap are skipped, and when "
        "every eligible endpoint is at it the request is shed with 429",
    )
    release_on: Literal["response_headers", "response_end"] = Field(
        "response_headers",
        description="when an in-flight request stops counting: at the response headers, or "
        "at the end of the response (needs Envoy to send the response body or trailers; "
        "the stream's end always releases)",
    )
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger OpenAI bodies get 413")
    max_subset: int = Field(4096, ge=1, description="longest subset hint accepted")
    assume_full_duplex: bool = Field(
        True,
        description="a stream without protocol_config (older Envoys, some gateways) is "
        "FULL_DUPLEX_STREAMED, GAIE's documented mode; false: BUFFERED",
    )
    pool_name: str | None = Field(
        None, description="GAIE InferencePool whose Ready pods are the endpoints (podIP:targetPort)"
    )
    pool_namespace: str | None = Field(
        None, description="namespace of the pool or selected pods (default: the pod's own, else the kubeconfig's)"
    )
    endpoint_selector: str | None = Field(
        None, description="without a pool: label selector of the endpoint pods (GAIE's standalone mode)"
    )
    endpoint_target_ports: list[int] = Field(
        default_factory=list, description="with endpoint_selector: the serving port(s) of each pod"
    )
    kubeconfig: str | None = Field(None, description="kubeconfig file (default: in-cluster, else $KUBECONFIG)")
    ready_without_scorer: bool = Field(
        False,
        description="readiness does not wait for the scorer to answer (requests are then "
        "picked by load and affinity until it does)",
    )
    breaker_failures: int = Field(5, ge=1, description="consecutive scorer failures that open the circuit breaker")
    breaker_cooldown_s: float = Field(2.0, ge=0.0, description="while open, requests skip the scorer; then one probe")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port, 0 = off")
    metrics_host: str = Field("0.0.0.0", min_length=1, description="Prometheus listen address")
    tls_cert: str | None = Field(None, description="PEM certificate chain: the gRPC server speaks TLS")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed (mTLS)"
    )
    scorer_ca_file: str | None = Field(None, description="PEM CA bundle that verifies an https:// scorer_url")
    scorer_token_file: str | None = Field(
        None, description="file holding the bearer token sent to the scorer (else $KVINDEX_SCORER_TOKEN)"
    )

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, value: list[str]) -> list[str]:
        seen: list[str] = []
        for item in value:
            try:
                ep = canonical_endpoint(item)
            except HintError as exc:
                raise ValueError(f"endpoint {exc}") from None
            if ep not in seen:
                seen.append(ep)
        return seen

    @field_validator("endpoint_target_ports")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        for port in value:
            if not 0 < port < 65536:
                raise ValueError(f"target port {port}: expected 1-65535")
        return list(dict.fromkeys(value))

    @field_validator("pool_name", "pool_namespace", "endpoint_selector", "kubeconfig")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def watches_kubernetes(self) -> bool:
        return self.pool_name is not None or self.endpoint_selector is not None

    @model_validator(mode="after")
    def _check_source(self) -> ExtprocConfig:
        if self.pool_name is not None and self.endpoint_selector is not None:
            raise ValueError(
                f"pool_name (--pool-name) {self.pool_name!r} and endpoint_selector (--endpoint-selector) "
                f"{self.endpoint_selector!r}: give one (the pool has its own selector)"
            )
        if self.endpoint_selector is not None and not self.endpoint_target_ports:
            raise ValueError(
                f"endpoint_selector (--endpoint-selector) {self.endpoint_selector!r} needs "
                "endpoint_target_ports (--endpoint-target-ports)"
            )
        if self.endpoint_target_ports and self.endpoint_selector is None:
            raise ValueError("endpoint_target_ports (--endpoint-target-ports) needs endpoint_selector")
        if self.watches_kubernetes and self.endpoints:
            raise ValueError(
                f"endpoints (--endpoint) {self.endpoints[0]!r}: not with a pool or selector (they are the endpoints)"
            )
        return self

    @field_validator("session_header")
    @classmethod
    def _lower_header(cls, value: str) -> str:
        # Envoy hands header names to ext_proc in lower case.
        return value.strip().lower()

    @field_validator("scorer_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"scorer_url {value!r}: expected http:// or https://")
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ExtprocConfig:
        if self.tls_cert is not None and self.tls_key is None:
            raise ValueError(f"tls_cert (--tls-cert) {self.tls_cert!r} needs tls_key (--tls-key): give both or neither")
        if self.tls_key is not None and self.tls_cert is None:
            raise ValueError(f"tls_key (--tls-key) {self.tls_key!r} needs tls_cert (--tls-cert): give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (--tls-client-ca) needs tls_cert and tls_key")
        return self

    @model_validator(mode="after")
    def _check_scorer_tls(self) -> ExtprocConfig:
        if (
            self.scorer_ca_file is not None
            and self.scorer_url is not None
            and not self.scorer_url.startswith("https://")
        ):
            raise ValueError(f"scorer_ca_file (--scorer-ca-file) needs an https:// scorer_url, got {self.scorer_url!r}")
        return self
