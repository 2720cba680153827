"""The Ray Serve internals `deployments/serve_compat.py` uses exist in the installed Ray, with the
signatures it calls them with; and its deadline arithmetic matches the router's."""

import asyncio
import dataclasses
import inspect

from deployments import serve_compat


def router():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID
    from ray.serve.request_router import RequestRouter

    class Router(RequestRouter):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            return []

    async def make():
        return Router(deployment_id=DeploymentID(name="LLMServer", app_name="vlm"),
                      handle_source=DeploymentHandleSource.UNKNOWN)

    return asyncio.run(make())


def test_deployment_response_and_replica_context():
    from ray.serve.context import ReplicaContext
    from ray.serve.handle import DeploymentResponse

    assert inspect.iscoroutinefunction(DeploymentResponse._to_object_ref)
    assert list(inspect.signature(DeploymentResponse._to_object_ref).parameters) == ["self"]
    assert "servable_object" in {f.name for f in dataclasses.fields(ReplicaContext)}


def test_request_router_internals():
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest, RequestRouter

    r = router()
    assert callable(serve_compat.queue_lens(r).get) and serve_compat.deployment_name(r) == "LLMServer"
    assert list(inspect.signature(RequestRouter._probe_queue_lens).parameters) == ["self", "replicas", "backoff_index"]
    assert "internal_request_id" in {f.name for f in dataclasses.fields(RequestMetadata)}
    assert "metadata" in {f.name for f in dataclasses.fields(PendingRequest)}
    # the deadline a backoff index gives: the first doubled per index, capped at the longest
    first, longest = r.queue_len_response_deadline_s, r.max_queue_len_response_deadline_s
    for want in (first, first * 3, longest):
        k = serve_compat._backoff_index(r, want)
        assert min(first * 2 ** k, max(first, longest)) >= min(want, longest)
        assert k == 0 or first * 2 ** (k - 1) < want
    assert asyncio.run(serve_compat.probe_queue_lens(r, [], 1.0)) == []
