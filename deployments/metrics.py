"""Metric constructors: `ray.serve.metrics` inside a replica, inert stand-ins elsewhere.

Serve's metrics need a replica context; the deployment classes also run in plain Python
(unit tests, notebooks), where their figures stay available through `stats()` only.
"""

from __future__ import annotations


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
