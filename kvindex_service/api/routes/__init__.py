"""One router per resource: scoring, pods, health, metrics, and the compatibility surfaces."""

from kvindex_service.api.routes import compat, health, metrics, pods, score

__all__ = ["compat", "health", "metrics", "pods", "score"]
