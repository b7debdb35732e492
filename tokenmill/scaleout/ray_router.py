"""`PrefixAwareRouter`: the Ray Serve request router of the engine deployments (the policy is
`prefix_router.rank_replicas`; Ray Serve imports this class by its path in each handle's
process)."""

from __future__ import annotations

from ray.serve._private.request_router.request_router import RequestRouter

from tokenmill.scaleout.prefix_router import PrefixIndex, prompt_block_hashes, rank_replicas


class PrefixAwareRouter(RequestRouter):
    def initialize_state(self, block_size: int = 16, imbalance: int = 4) -> None:
        """`block_size`: the engines' KV block size; `imbalance`: how many more ongoing requests
        a prefix holder may have than the least loaded replica and still be preferred."""
        self._index = PrefixIndex()
        self._block_size = block_size
        self._imbalance = imbalance

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        hashes = self._prompt_hashes(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {}
        for replica_id in by_id:
            load = self._replica_queue_len_cache.get(replica_id)
            if load is not None:
                loads[replica_id] = load
        matches = {replica_id: self._index.match(replica_id, hashes) for replica_id in by_id}
        ranks = rank_replicas(list(by_id), matches, loads, len(hashes), self._imbalance)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self._index.add(replica_id, self._prompt_hashes(pending_request))

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self._index.forget(replica_id)

    def _prompt_hashes(self, pending_request) -> list[int]:
        """The engine call's first argument is the prompt's token ids."""
        if pending_request is None or not pending_request.args:
            return []
        return prompt_block_hashes(pending_request.args[0], self._block_size)
