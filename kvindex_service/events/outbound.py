"""Where ``POST /pods`` may make the service connect: checked before any socket is made.

The endpoint must be ``tcp://host:port`` (port 1-65535) or, only while ``zmq.connect_allow`` is
empty, ``ipc://path``; the host must resolve (resolution runs off the event loop); and when
``zmq.connect_allow`` lists CIDRs, every address the host resolves to must be inside them. In
that case the subscription is made to the resolved address itself, so that a later DNS answer
cannot move it elsewhere (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from kvindex_service.errors import BadEndpointError
from kvindex_service.events.admission import EndpointForbiddenError, Network, in_networks, safe_text
from kvindex_service.events.topic import validate_endpoint

__all__ = ["check_outbound"]


async def check_outbound(endpoint: str, allow: Sequence[Network], what: str = "endpoint") -> str:
    """The endpoint to connect to (``endpoint`` itself, or pinned to its resolved address when
    ``allow`` is set). ``BadEndpointError`` (400) for a malformed or unresolvable endpoint,
    ``EndpointForbiddenError`` (403) for one outside ``allow``."""
    shown = safe_text(endpoint, 200)
    try:
        validate_endpoint(endpoint)
    except ValueError as exc:
        raise BadEndpointError(f"bad {what} {shown}: {safe_text(exc, 300)}") from None
    scheme, _, address = endpoint.partition("://")
    if scheme != "tcp":
        if allow:
            raise EndpointForbiddenError(f"{what} {shown}: only tcp:// endpoints are allowed (zmq.connect_allow)")
        return endpoint
    host, _, port = address.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise BadEndpointError(f"bad {what} {shown}: cannot resolve host {safe_text(bare)!r} ({exc})") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        addresses.append(ip)
    if not addresses:
        raise BadEndpointError(f"bad {what} {shown}: host {safe_text(bare)!r} has no address")
    if not allow:
        return endpoint
    outside = [str(ip) for ip in addresses if not in_networks(ip, allow)]
    if outside:
        raise EndpointForbiddenError(f"{what} {shown}: {', '.join(sorted(set(outside)))} is outside zmq.connect_allow")
    ip = addresses[0]
    return f"tcp://{ip}:{port}" if ip.version == 4 else f"tcp://[{ip}]:{port}"
