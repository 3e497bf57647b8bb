"""``index.backend``: where the block index lives. ``memory`` (the default) is the in-process
Rust index; a Redis / Valkey URL puts it in a shared server that several replicas read and
write. The one place the accepted forms are spelled out."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = ["SCHEMES", "BackendURL", "parse_backend"]

#: scheme -> (TLS, cluster)
SCHEMES: dict[str, tuple[bool, bool]] = {
    "redis": (False, False),
    "rediss": (True, False),
    "valkey": (False, False),
    "valkeys": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
    "valkey+cluster": (False, True),
    "valkeys+cluster": (True, True),
}


@dataclass(frozen=True, slots=True)
class BackendURL:
    """A parsed Redis / Valkey URL (``memory`` is not one: ``parse_backend`` returns None)."""

    host: str
    port: int
    db: int
    tls: bool
    cluster: bool
    username: str | None
    password: str | None

    def redacted(self) -> str:
        """For logs: never the password."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_backend(value: str) -> BackendURL | None:
    """None for ``memory``; a ``BackendURL`` for ``redis[s]://[user:pass@]host[:port][/db]``,
    ``valkey[s]://`` and their ``+cluster`` forms; ValueError naming the problem otherwise."""
    if value == "memory":
        return None
    scheme, sep, _ = value.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        forms = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"index.backend must be 'memory' or a URL starting with one of {forms} (got {value!r})")
    tls, cluster = SCHEMES[scheme.lower()]
    parts = urlsplit(value)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"index.backend has a bad port: {value!r}") from None
    if not parts.hostname:
        raise ValueError(f"index.backend names no host: {value!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"index.backend takes no query or fragment: {value!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"index.backend database must be a number (got {path!r})")
    db = int(path) if path else 0
    if cluster and db != 0:
        raise ValueError("index.backend: a Redis cluster has only database 0")
    return BackendURL(
        host=parts.hostname,
        port=port,
        db=db,
        tls=tls,
        cluster=cluster,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
