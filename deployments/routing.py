"""Cache-aware routing across replicas: a request goes where what it needs is already cached.

`CacheAffinityRouter` is a Ray Serve request router (`RequestRouter` API), configured per
deployment through `request_router_config` (`settings.py` derives it from `llm.routing` and
`vision.routing`). It runs in every process that holds a handle to the deployment (each Ingress
replica) and routes each call on keys taken from the call's arguments:

  prompt_blocks (LLMServer): the prefix-cache keys of the prompt's full blocks, first to last
      (`prompt_block_keys`: the same chained hashes of token ids and image content that the
      engine's prefix cache uses), so a conversation's next turn, which starts with the previous
      turn's prompt and answer, matches the blocks that turn left in one replica's cache;
  media (VisionEncoder): the content hashes of the request's pictures, which the encoder's LRU
      cache is keyed by.

Policy, per request:
  1. the replica this router last sent the request's deepest key to (a bounded index, least
     recently used keys evicted first) -- the longest cached prefix;
  2. else rendezvous hashing of the first key over the live replicas: every router (every Ingress
     replica) picks the same replica for a conversation without sharing state, and when a
     replica joins or leaves only the keys it wins or held move;
  3. the load bound: when sending the request to the preferred replica would put its queue (its
     ongoing requests) more than `imbalance` above the least loaded replica's, the least loaded
     replica takes it. A request that found no cached prefix (step 2) has nothing cached to gain
     where it goes but its conversation's next turns, so it yields at half the bound: under a
     hot prefix, cold requests fill the other replicas before the hot one's queue reaches the
     bound. Queues are this router's own figures (Serve's queue-length cache, kept by its sends
     and their completions) while these put the preferred replica within half its bound, and
     asked of the replicas otherwise (they also count what other Ingress replicas sent).
Keys whose replica is gone are passed over, so a replica's death moves its conversations to
the others (their next turn is prefilled again there). A request without keys (a prompt shorter
than a block, no pictures) is routed by power of two choices, as by Serve's default router.

Decisions are counted per deployment in `vlm_routing_decisions` (cached | hashed | load |
unkeyed) and in `metrics.routing_decisions()` (the Ingress's `stats()`); `metrics.routing_probes()`
counts those that asked the replicas for their queues.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, \
    RunningReplica

from vlm_core.engine.kv_cache import prompt_block_keys
from vlm_core.engine.request import EngineRequest

from .metrics import metric, record_routing_decision, record_routing_probe

ROUTER_PATH = "deployments.routing.CacheAffinityRouter"


def rendezvous_score(key: bytes, replica: ReplicaID) -> int:
    return int.from_bytes(hashlib.blake2b(key + replica.unique_id.encode(), digest_size=8).digest(), "big")


class CacheAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, keys: str = "prompt_blocks", block_size: int = 16, imbalance: int = 8,
                         index_size: int = 100_000):
        if keys not in ("prompt_blocks", "media"):
            raise ValueError(f"keys must be 'prompt_blocks' or 'media', got {keys!r}")
        self._keys_of = keys
        self._block_size = block_size
        self._imbalance = imbalance
        self._index_size = index_size
        self._index: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self._routing: OrderedDict[str, tuple] = OrderedDict()   # request -> (its keys, the replica chosen)
        self._chosen: Counter[ReplicaID] = Counter()                # replica -> requests this router chose for it
        self._metric = metric("Counter", "vlm_routing_decisions", "requests routed, by decision: cached (the "
                              "replica holding the longest cached prefix), hashed (rendezvous), load (load "
                              "bound), unkeyed (power of two choices)", tag_keys=("target", "decision"))

    # ---- keys -----------------------------------------------------------------------------

    def request_keys(self, pending: PendingRequest | None) -> list[bytes]:
        if pending is None:
            return []
        if self._keys_of == "prompt_blocks":
            for arg in pending.args:
                if isinstance(arg, EngineRequest):
                    return prompt_block_keys(arg.prompt, arg.image_hashes, self._block_size)
            return []
        hashes = pending.args[1] if len(pending.args) > 1 else pending.kwargs.get("hashes", ())
        return [str(h).encode() for h in hashes or ()]

    # ---- choice ---------------------------------------------------------------------------

    async def _loads(self, replicas: list[RunningReplica], preferred: ReplicaID, bound: int) -> dict[ReplicaID, int]:
        """Each replica's ongoing requests: this router's own figures while they put the preferred
        replica within half its bound of the least loaded; else, or where they are missing, asked
        of the replicas, plus what this router chose for each while it waited for the answers (a
        burst of requests, all waiting on their probes, would otherwise all see the same queues
        and pile onto one replica). A replica that does not answer in time keeps its cached figure."""
        cache = self._replica_queue_len_cache
        loads = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        known = [q for q in loads.values() if q is not None]
        if len(known) == len(replicas) and loads[preferred] - min(known) <= bound // 2:
            return loads
        record_routing_probe(self._deployment_id.name)
        chosen = {r.replica_id: self._chosen[r.replica_id] for r in replicas}
        for r, q in await self._probe_queue_lens(replicas, 0):
            if q is not None:
                loads[r.replica_id] = q + self._chosen[r.replica_id] - chosen[r.replica_id]
        return {rid: q for rid, q in loads.items() if q is not None}

    def preferred(self, keys: list[bytes], live: dict[ReplicaID, RunningReplica]) -> tuple[ReplicaID, str]:
        for key in reversed(keys):
            rid = self._index.get(key)
            if rid in live:
                return rid, "cached"
        return max(live, key=lambda rid: rendezvous_score(keys[0], rid)), "hashed"

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        keys = self.request_keys(pending_request)
        if not keys or not candidate_replicas:
            self._decided(pending_request, (), None, "unkeyed")
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]   # the lower queue wins
        live = {r.replica_id: r for r in candidate_replicas}
        rid, decision = self.preferred(keys, live)
        bound = self._imbalance if decision == "cached" else self._imbalance // 2
        loads = await self._loads(candidate_replicas, rid, bound) if len(candidate_replicas) > 1 else {}
        known = [r for r in candidate_replicas if r.replica_id in loads]
        ranked = sorted(known, key=lambda r: loads[r.replica_id]) + [r for r in candidate_replicas
                                                                      if r.replica_id not in loads]
        others = [loads[r.replica_id] for r in ranked if r.replica_id in loads and r.replica_id != rid]
        if rid in loads and others and loads[rid] + 1 - others[0] > bound and others[0] < loads[rid]:
            rid, decision = ranked[0].replica_id, "load"
        self._decided(pending_request, keys, rid, decision)
        return [[live[rid]], [r for r in ranked if r.replica_id != rid]]

    def _decided(self, pending: PendingRequest | None, keys, rid: ReplicaID | None, decision: str) -> None:
        """Count a request's decision once (a request refused by a full replica is chosen for
        again) and index its keys under the replica it goes to."""
        if pending is not None:
            request = pending.metadata.internal_request_id
            if request in self._routing:
                return
            self._routing[request] = (keys, rid)
            while len(self._routing) > 10_000:
                self._routing.popitem(last=False)
        self._index_keys(keys, rid)
        if rid is not None:
            self._chosen[rid] += 1
        name = self._deployment_id.name
        record_routing_decision(name, decision)
        self._metric.inc(tags={"target": name, "decision": decision})

    def _index_keys(self, keys, rid: ReplicaID | None) -> None:
        for key in keys:
            self._index[key] = rid
            self._index.move_to_end(key)
        while len(self._index) > self._index_size:
            self._index.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """(Serve calls this where replicas may refuse requests.) A request the preferred replica
        refused went elsewhere: its keys now point there."""
        keys, rid = self._routing.get(pending_request.metadata.internal_request_id, ((), None))
        if keys and replica_id != rid:
            self._index_keys(keys, replica_id)
