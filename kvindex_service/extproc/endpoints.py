"""The endpoints the picker may route to, and where they come from.

Three sources (``ExtprocConfig``): a static ``--endpoint`` list; the Ready pods of a GAIE
``InferencePool`` (``--pool-name``/``--pool-namespace``); or, like GAIE's standalone mode, the
Ready pods of a label selector with fixed target ports (``--endpoint-selector``/
``--endpoint-target-ports``). The Kubernetes sources run
:class:`~kvindex_service.discovery.endpoints.EndpointWatch` (the scoring service's watch
code) and replace the set whole on every change.

The subset rule: a request's candidates are its hint's entries that are known endpoints
(compared as canonical addresses), or every known endpoint when there is no hint. With no
source configured at all (no list, no pool, no selector) nothing is known and the hint alone
says where a request may go ("hint-only" mode, for gateways that always send one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvindex_service.extproc.hints import canonical_endpoint

if TYPE_CHECKING:
    from kvindex_service.discovery.endpoints import EndpointWatch
    from kvindex_service.extproc.config import ExtprocConfig

__all__ = ["EndpointSet", "start_endpoint_watch"]


@dataclass(frozen=True)
class _View:
    order: tuple[str, ...]
    by_canonical: dict[str, str]
    members: frozenset[str]

    @classmethod
    def of(cls, endpoints: Iterable[str]) -> _View:
        by: dict[str, str] = {}
        for ep in endpoints:
            by.setdefault(canonical_endpoint(ep), ep)
        return cls(tuple(by.values()), by, frozenset(by.values()))


class EndpointSet:
    """The known endpoints, swapped whole (one reference) by :meth:`replace` from any thread
    and read by the picker on its event loop without a lock."""

    def __init__(self, static: Iterable[str] = (), *, watched: bool = False) -> None:
        self.watched = watched
        self._view = _View.of(static)
        self.synced = not watched
        """Static lists are known from the start; watched ones after the first list."""
        self.changes = 0

    @classmethod
    def for_config(cls, config: ExtprocConfig) -> EndpointSet:
        return cls(config.endpoints, watched=config.watches_kubernetes)

    @property
    def hint_only(self) -> bool:
        """No source at all: the subset hint is taken as the list of endpoints."""
        return not self.watched and not self._view.order

    def current(self) -> tuple[str, ...]:
        return self._view.order

    def replace(self, endpoints: Iterable[str]) -> None:
        self._view = _View.of(endpoints)
        self.synced = True
        self.changes += 1

    def known(self, endpoint: str) -> bool:
        view = self._view
        if endpoint in view.members:
            return True
        try:
            return canonical_endpoint(endpoint) in view.by_canonical
        except ValueError:
            return False

    def intersect(self, hint: Sequence[str]) -> tuple[list[str], int]:
        """The hint's entries that are known (in the hint's order, in the known spelling), and
        how many entries were not."""
        if self.hint_only:
            return list(dict.fromkeys(hint)), 0
        by = self._view.by_canonical
        out: dict[str, None] = {}  # ordered, and O(1) de-duplication (hints run to thousands)
        missing = 0
        for entry in hint:
            ep = by.get(entry)  # the hint filter hands over canonical entries
            if ep is None:
                try:
                    ep = by.get(canonical_endpoint(entry))
                except ValueError:
                    ep = None
            if ep is None:
                missing += 1
            else:
                out[ep] = None
        return list(out), missing


def start_endpoint_watch(config: ExtprocConfig, endpoints: EndpointSet) -> EndpointWatch | None:
    """Start the Kubernetes watch the config asks for (None: the list is static). Raises
    ``ValueError`` (one line) when there is no usable Kubernetes configuration."""
    if not config.watches_kubernetes:
        return None
    from kvindex_service.discovery.endpoints import EndpointWatch

    watch = EndpointWatch(
        endpoints.replace,
        namespace=config.pool_namespace,
        pool_name=config.pool_name,
        selector=config.endpoint_selector,
        ports=tuple(config.endpoint_target_ports),
        kubeconfig=config.kubeconfig,
    )
    watch.start()
    return watch
