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
  1. the replicas this router sent the request's deepest indexed key to (a bounded index of key
     -> the replicas holding it, least recently used keys evicted first) -- those holding the
     longest cached prefix; the least loaded of them;
  2. else rendezvous hashing of the first key over the live replicas: every router (every Ingress
     replica) picks the same replica for a conversation without sharing state, and when a
     replica joins or leaves only the keys it wins or held move;
  3. the load bound: when sending the request to the preferred replica would put its queue (its
     ongoing requests) more than `imbalance` above the least loaded replica's, the least loaded
     replica takes it. A request that found no cached prefix (step 2) has nothing cached to gain
     where it goes but its conversation's next turns, so it yields at half the bound: under a
     hot prefix, cold requests fill the other replicas before the hot one's queue reaches the
     bound.
Every key of a request gains its replica as a holder. So a conversation the bound moved has its
next turn follow it there, and a hot prefix, once the bound has sent it to a second replica, is
held by both and goes to whichever is less loaded: it costs no imbalance from then on.
Queues are this router's own figures: Serve's queue-length cache (the replicas' last answers,
plus this router's sends since, minus their completions) and the requests chosen but not yet
sent (a burst decided in one go would otherwise all see the same queues). Only the replicas'
answers count what other Ingress replicas sent, so a request whose preferred replica the figures
put past half its bound -- one the bound may decide -- waits for fresh answers (one probe at a
time, shared by the requests that wait; at most Serve's first queue-length deadline, then it goes
on the figures). Otherwise the figures decide at once, and the replicas are asked again in the
background at least every `refresh_s`. A request that finds a replica without a figure waits
for the answers.
Keys whose replica is gone are passed over, so a replica's death moves its conversations to
the others (their next turn is prefilled again there). A request without keys (a prompt shorter
than a block, no pictures) is routed by power of two choices, as by Serve's default router.

Decisions are counted per deployment in `vlm_routing_decisions` (cached | hashed | load |
unkeyed) and in `metrics.routing_decisions()` (the Ingress's `stats()`); `metrics.routing_probes()`
counts the times this router asked the replicas for their queues.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict, deque

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, \
    RunningReplica

from vlm_core.engine.blocks import prompt_block_keys
from vlm_core.engine.request import EngineRequest

from .metrics import metric, record_routing_decision, record_routing_probe
from .serve_compat import deployment_name, probe_queue_lens, queue_lens, request_id

ROUTER_PATH = "deployments.routing.CacheAffinityRouter"
MAX_HOLDERS = 8         # replicas remembered per key, latest first (those gone drop out as others come)
# Background probes wait up to Serve's longest queue-length deadline (RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_
# DEADLINE_S, 1 s): off the request path, a late answer still corrects the figures, where the first
# deadline (0.1 s) would drop every answer from busy replicas on a loaded host and leave them stale.
BACKGROUND_PROBE_DEADLINE_S = 1.0


def rendezvous_score(key: bytes, replica: ReplicaID) -> int:
    return int.from_bytes(hashlib.blake2b(key + replica.unique_id.encode(), digest_size=8).digest(), "big")


class CacheAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, keys: str = "prompt_blocks", block_size: int = 16, imbalance: int = 8,
                         index_size: int = 100_000, refresh_s: float = 1.0):
        if keys not in ("prompt_blocks", "media"):
            raise ValueError(f"keys must be 'prompt_blocks' or 'media', got {keys!r}")
        self._keys_of = keys
        self._block_size = block_size
        self._imbalance = imbalance
        self._index_size = index_size
        self._index: OrderedDict[bytes, list[ReplicaID]] = OrderedDict()   # key -> holders, latest first
        self._refresh_s = refresh_s
        self._routing: OrderedDict[str, tuple] = OrderedDict()   # request -> (its keys, the replica chosen)
        self._unsent: dict[ReplicaID, deque] = {}                # replica -> when each unsent choice was made
        self._refreshing: asyncio.Task | None = None
        self._asked_at = 0.0
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
                    return prompt_block_keys(arg.prompt, arg.media_hashes, self._block_size, arg.cache_salt)
            return []
        hashes = pending.args[1] if len(pending.args) > 1 else pending.kwargs.get("hashes", ())
        return [str(h).encode() for h in hashes or ()]

    # ---- choice ---------------------------------------------------------------------------

    async def _loads(self, replicas: list[RunningReplica], preferred: list[ReplicaID],
                     bound: int) -> dict[ReplicaID, int]:
        """Each replica's ongoing requests as this router knows them (see the module's docstring):
        a replica without a figure is asked and waited for; when the figures put the preferred
        replicas past half the bound, the replicas are asked and their answers waited for (at most
        Serve's first queue-length deadline), as the bound may decide this request and the figures
        lack what other routers sent; figures last asked for `refresh_s` ago are asked again in the
        background. A replica that does not answer in time is left out."""
        missing = [r for r in replicas if queue_lens(self).get(r.replica_id) is None]
        if missing:
            record_routing_probe(deployment_name(self))
            self._asked_at = time.monotonic()
            answers = {r.replica_id: q for r, q in
                       await probe_queue_lens(self, missing, self.queue_len_response_deadline_s)}
            return self._figures(replicas, answers)
        loads = self._figures(replicas)
        if min(loads[rid] for rid in preferred) - min(loads.values()) > bound // 2:
            self._ask_in_background(replicas)
            try:
                await asyncio.wait_for(asyncio.shield(self._refreshing), self.queue_len_response_deadline_s)
            except asyncio.TimeoutError:
                return loads
            return self._figures(replicas)
        if time.monotonic() - self._asked_at > self._refresh_s:
            self._ask_in_background(replicas)
        return loads

    def _figures(self, replicas: list[RunningReplica], answers: dict | None = None) -> dict[ReplicaID, int]:
        """Serve's queue-length cache (or the replicas' `answers` just given) plus the requests
        chosen and not yet sent, for the replicas that have a figure."""
        cache, answers = queue_lens(self), answers or {}
        loads = {r.replica_id: answers[r.replica_id] if r.replica_id in answers else cache.get(r.replica_id)
                 for r in replicas}
        return {rid: q + self._unsent_to(rid) for rid, q in loads.items() if q is not None}

    def _ask_in_background(self, replicas: list[RunningReplica]) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            return
        record_routing_probe(deployment_name(self))
        self._asked_at = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(
            probe_queue_lens(self, replicas, BACKGROUND_PROBE_DEADLINE_S))

    def _unsent_to(self, rid: ReplicaID) -> int:
        """Requests chosen for `rid` and not sent yet (a choice Serve sent elsewhere, because the
        replica was full or gone, is forgotten after a second)."""
        times = self._unsent.get(rid)
        if not times:
            return 0
        forgotten = time.monotonic() - 1.0
        while times and times[0] < forgotten:
            times.popleft()
        return len(times)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)                   # Serve's queue-length cache counts it now
        times = self._unsent.get(replica_id)
        if times:
            times.popleft()

    def preferred(self, keys: list[bytes], live: dict[ReplicaID, RunningReplica]) -> tuple[list[ReplicaID], str]:
        """The live replicas holding the deepest indexed key (latest first), else the one
        rendezvous hashing picks."""
        for key in reversed(keys):
            holders = [rid for rid in self._index.get(key, ()) if rid in live]
            if holders:
                return holders, "cached"
        return [max(live, key=lambda rid: rendezvous_score(keys[0], rid))], "hashed"

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        keys = self.request_keys(pending_request)
        if not keys or not candidate_replicas:
            self._decided(pending_request, (), None, "unkeyed")
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]   # the lower queue wins
        live = {r.replica_id: r for r in candidate_replicas}
        holders, decision = self.preferred(keys, live)
        bound = self._imbalance if decision == "cached" else self._imbalance // 2
        loads = await self._loads(candidate_replicas, holders, bound) if len(candidate_replicas) > 1 else {}
        rid = min(holders, key=lambda h: loads.get(h, float("inf")))       # ties: the latest holder
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
            request = request_id(pending)
            if request in self._routing:
                return
            self._routing[request] = (keys, rid)
            while len(self._routing) > 10_000:
                self._routing.popitem(last=False)
        self._index_keys(keys, rid)
        if rid is not None:
            self._unsent.setdefault(rid, deque()).append(time.monotonic())
        name = deployment_name(self)
        record_routing_decision(name, decision)
        self._metric.inc(tags={"target": name, "decision": decision})

    def _index_keys(self, keys, rid: ReplicaID | None) -> None:
        """`rid` becomes the latest holder of each of `keys`."""
        if rid is None:
            return
        for key in keys:
            holders = self._index.get(key)
            if holders is None:
                self._index[key] = [rid]
            else:
                if rid in holders:
                    holders.remove(rid)
                holders.insert(0, rid)
                del holders[MAX_HOLDERS:]
                self._index.move_to_end(key)
        while len(self._index) > self._index_size:
            self._index.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """(Serve calls this where replicas may refuse requests.) A request the preferred replica
        refused went elsewhere: its keys are held there too."""
        keys, rid = self._routing.get(request_id(pending_request), ((), None))
        if keys and replica_id != rid:
            self._index_keys(keys, replica_id)
