"""Kubernetes pod discovery: subscribe (connect mode) to the Ready pods a label selector finds.

``reconcile.py`` decides (pod objects in, subscribe / unsubscribe actions out, no I/O);
``kube.py`` talks to the API server with the official ``kubernetes`` client; ``watch.py`` runs
list + watch on its own thread and hands the actions to the event subscriber.
"""

from kvindex_service.discovery.reconcile import POD_STATES, Ports, Reconciler, Subscribe, Target, Unsubscribe
from kvindex_service.discovery.watch import Discovery

__all__ = ["POD_STATES", "Discovery", "Ports", "Reconciler", "Subscribe", "Target", "Unsubscribe"]
