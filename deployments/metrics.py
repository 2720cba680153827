"""Metric constructors: `ray.serve.metrics` inside a replica, inert stand-ins elsewhere.

Serve's metrics need a replica context; the deployment classes also run in plain Python
(unit tests, notebooks), where their figures stay available through `stats()` only.
"""

from __future__ import annotations

from collections import Counter

_ROUTING: Counter = Counter()     # (deployment routed to, decision) -> requests, in this process
_PROBES: Counter = Counter()      # deployment routed to -> times its replicas were asked their queues


class _Inert:
    def __init__(self, *args, **kwargs):
        pass

    def observe(self, *args, **kwargs):
        pass

    def set(self, *args, **kwargs):
        pass

    def inc(self, *args, **kwargs):
        pass


def _in_replica() -> bool:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
        return True
    except RayServeException:
        return False


def metric(kind: str, *args, **kwargs):
    """`metric("Histogram", name, description, boundaries)`, likewise "Gauge" and "Counter"."""
    if _in_replica():
        from ray.serve import metrics

        return getattr(metrics, kind)(*args, **kwargs)
    return _Inert()


def record_routing_decision(target: str, decision: str) -> None:
    """Count a routing decision in this process (`deployments/routing.py`). The count lives here,
    not in the router's module: Serve ships a router class by value, with its own module globals."""
    _ROUTING[(target, decision)] += 1


def record_routing_probe(target: str) -> None:
    _PROBES[target] += 1


def routing_probes() -> dict[str, int]:
    """Times the routers in this process asked the replicas for their queues, per deployment."""
    return dict(_PROBES)


def routing_decisions() -> dict[str, dict[str, int]]:
    """Routing decisions made in this process, per deployment routed to."""
    out: dict[str, dict[str, int]] = {}
    for (target, decision), n in _ROUTING.items():
        out.setdefault(target, {})[decision] = n
    return out
