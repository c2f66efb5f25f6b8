"""Stream affinity: every frame of a stream reaches the replica holding its slot.

`StreamAffinityRouter` is a Ray Serve `RequestRouter` (configured on the deployment through
`request_router_config`). The routing key is the request's `session_id`, which `CodecClient`
sets to a stream id. The owner of a key is chosen by rendezvous (highest-random-weight)
hashing over the live replicas' unique ids: a pure function of (key, replica set), so every
bridge process agrees without talking to the others, and adding or losing a replica moves
only the streams that hashed to it (they land on a replica that does not hold their epoch,
get `fallback/reset`, and start a new epoch there - see contract.py).

A client groups its streams by owner so it sends one request per replica per tick; it asks
the router instance living in its own process (`affinity.local_view`) for the current owners.
That lookup is only an optimisation: the router routes by the key it is given, and a stale
grouping costs a reset, never a wrong decode. The hashing and the per-process view live in
affinity.py because Serve pickles this module by value when it ships the router class.
"""

from __future__ import annotations

import logging

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments import affinity

logger = logging.getLogger(__name__)

ROUTER_PATH = "deployments.router.StreamAffinityRouter"


class StreamAffinityRouter(RequestRouter):
    """Routes a request to the rendezvous-hash owner of its `session_id`.

    Kwargs (`request_router_kwargs`): `num_fallback_replicas` (default 0 = strict affinity).
    With fallbacks, a request the owner rejects (backpressure) may go to the next-ranked
    replica; that replica answers its continuing frames `fallback/reset`, which is safe but
    costs the streams their state, so strict affinity is the default and the replica's
    `max_ongoing_requests` is sized for one request per bridge per tick.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._num_fallback_replicas = 0
        self._owner_cache: dict[str, str] = {}
        self._uids: tuple[str, ...] = ()
        affinity.register(self, self._deployment_id.app_name, self._deployment_id.name)

    def initialize_state(self, **kwargs) -> None:
        n = kwargs.get("num_fallback_replicas", 0)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"num_fallback_replicas must be a non-negative int, got {n!r}")
        self._num_fallback_replicas = n

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._refresh_owners()

    def on_replica_actor_died(self, replica_id) -> None:
        # Serve stops routing to a dead replica before the controller's next broadcast; the
        # ownership view must drop it at the same moment, or clients group by a dead owner.
        super().on_replica_actor_died(replica_id)
        self._refresh_owners()

    def _refresh_owners(self) -> None:
        uids = tuple(sorted(rid.unique_id for rid in self.curr_replicas))
        if uids != self._uids:
            self._uids = uids
            self._owner_cache = {}
            logger.info("stream affinity over %d replicas", len(uids))

    def replica_uids(self) -> list[str]:
        return list(self._uids)

    def owner_of(self, key: str) -> str | None:
        # Read from the client's thread; the cache dict is replaced (not mutated) on change.
        cache = self._owner_cache
        hit = cache.get(key)
        if hit is None:
            hit = affinity.owner(key, self._uids)
            if hit is not None and len(cache) < 1_000_000:
                cache[key] = hit
        return hit

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None or not pending_request.metadata.session_id:
            # Requests without a key (health probes, control calls) go anywhere.
            return [candidate_replicas]
        # Back off between retries instead of spinning while the owner is saturated.
        pending_request.routing_context.should_backoff = True
        by_uid = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = affinity.rank_replicas(pending_request.metadata.session_id, by_uid)
        return [[by_uid[uid]] for uid in ranked[: 1 + self._num_fallback_replicas]]
