"""The Ray Serve internals this application relies on, in one place (and `tests/test_serve_compat.py`
checks that the installed Ray still has each, with the signature used here).

    wait_computed(response)                 wait until a DeploymentResponse's value exists, not fetching it
    replica_object()                        the deployment object of the replica this code runs in
    For a `RequestRouter` subclass (`routing.py`):
    queue_lens(router)                      Serve's cache of each replica's queue length (`.get(replica_id)`)
    await probe_queue_lens(router, replicas, deadline_s)   ask replicas their queue lengths, waiting at
                                            most about `deadline_s` (it also refreshes that cache)
    deployment_name(router), request_id(pending)

Serve offers no public way to do these; they read Ray 2.x's `DeploymentResponse`, `ReplicaContext`,
`RequestRouter` and `PendingRequest` (Ray is pinned in pyproject to the minor range tested).
"""

from __future__ import annotations

import asyncio
import math


async def wait_computed(response) -> None:
    """Wait until a deployment response is computed, without fetching its value here.

    A call made with this response as an argument is routed only then, so the callee's queue limit
    (`max_queued_requests`) sees it as queued the moment it is: Serve checks that limit when a call
    is made, and a call whose argument is still being computed would not count yet.
    """
    import ray

    ref = await response._to_object_ref()
    await asyncio.to_thread(ray.wait, [ref], fetch_local=False)


def replica_object():
    """The user object (the deployment class instance) of the current replica."""
    from ray import serve

    return serve.get_replica_context().servable_object


def queue_lens(router):
    """Serve's cache of the replicas' queue lengths, kept by the router base class."""
    return router._replica_queue_len_cache


def _backoff_index(router, deadline_s: float) -> int:
    """The probe backoff index whose deadline (the router's first queue-length deadline doubled per
    index, capped at its longest) is the first to reach `deadline_s`."""
    first = router.queue_len_response_deadline_s
    if deadline_s <= first:
        return 0
    return max(0, math.ceil(math.log2(deadline_s / first)))


async def probe_queue_lens(router, replicas, deadline_s: float):
    """[(replica, queue length or None)] for `replicas`, each given until about `deadline_s` (within
    the router's own longest deadline); the answers also go into `queue_lens(router)`."""
    return await router._probe_queue_lens(replicas, _backoff_index(router, deadline_s))


def deployment_name(router) -> str:
    return router._deployment_id.name


def request_id(pending) -> str:
    """The id Serve gives a request for its routing (the same on every try of it)."""
    return pending.metadata.internal_request_id
