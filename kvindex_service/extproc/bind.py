"""Listen addresses: a clear error for a taken port, and the gRPC form of ``host:port``."""

from __future__ import annotations

import socket

from kvindex_service.extproc.security import ConfigError

__all__ = ["check_free", "grpc_target"]


def check_free(host: str, port: int) -> None:
    """Fail with one clear line when ``host:port`` is taken (gRPC's own bind error is a
    generic RuntimeError plus a C-core log line)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC does: a port held only by TIME_WAIT connections is free; a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None


def grpc_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
