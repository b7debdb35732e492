"""Tensor-parallel ranks 1..K-1 as Ray actors, in the engine's placement group.

An engine replica on Ray Serve that runs K ranks reserves a placement group of K bundles (its
deployment's `placement_group_bundles`, scaleout/cluster.py); the replica actor, rank 0, takes
bundle 0. Rank r goes in bundle r, where Ray placed that bundle: on this node or, across nodes,
another (strategy PACK: one node while it fits). Each actor runs the same `run_worker` loop as a
local worker process, binding gloo to its own node's address and meeting rank 0 at its store.

Liveness: a rank whose `run` call has ended (returned, raised, or its actor died) is dead; the
engine's next step raises naming it, as with local processes. Stop: rank 0's stop broadcast,
then the actors are killed once their call has ended or STOP_TIMEOUT_S has passed.
"""

from __future__ import annotations

import ray
from ray.util import get_current_placement_group, get_node_ip_address
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tokenmill.distributed.worker import STOP_TIMEOUT_S, WorkerSpec, run_worker


class TensorParallelRank:
    """One worker rank in a Ray actor."""

    def run(self, rank: int, spec: WorkerSpec, port: int) -> None:
        run_worker(rank, spec, port, get_node_ip_address())


class RayRanks:
    """Ranks 1..K-1 in bundles 1..K-1 of the current placement group."""

    def __init__(self, spec: WorkerSpec, port: int):
        group = get_current_placement_group()
        if group is None or group.bundle_count < spec.size:
            raise ValueError(f"{spec.size} tensor-parallel ranks need a placement group of "
                             f"{spec.size} bundles, one per rank")
        actor = ray.remote(TensorParallelRank)
        self.actors, self.calls = [], []
        for rank in range(1, spec.size):
            handle = actor.options(
                name=None, num_cpus=spec.num_threads,
                num_gpus=1 if spec.device_type == "cuda" else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank)).remote()
            self.actors.append(handle)
            self.calls.append(handle.run.remote(rank, spec, port))

    def describe(self) -> str:
        return f"{len(self.actors)} Ray actors in the placement group"

    def dead(self) -> str | None:
        """Why the first rank whose call ended did, or None while all run."""
        for rank, call in enumerate(self.calls, start=1):
            ended, _ = ray.wait([call], timeout=0)
            if ended:
                try:
                    ray.get(call)
                    cause = "it returned"
                except Exception as exc:  # its actor died, or run_worker raised
                    cause = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                return (f"tensor-parallel worker rank {rank} (a Ray actor) ended ({cause}); the "
                        f"engine cannot run without it")
        return None

    def stop(self) -> None:
        ray.wait(self.calls, num_returns=len(self.calls), timeout=STOP_TIMEOUT_S)
        for actor in self.actors:
            ray.kill(actor)
