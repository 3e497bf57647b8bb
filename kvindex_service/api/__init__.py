"""HTTP transport: the FastAPI app serving ``/score``, ``/pods``, health, metrics and the
llm-d / Mooncake compatibility routes. A thin layer over :mod:`kvindex_service.scoring` and
:mod:`kvindex_service.runtime`; it never imports the Envoy picker (``extproc``)."""

from kvindex_service.api.app import create_app

__all__ = ["create_app"]
