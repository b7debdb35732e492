"""Tensor-parallel ranks 1..K-1 as Ray actors, in the engine's placement group.

An engine replica on Ray Serve that runs K ranks reserves a placement group of K bundles, one
per rank (its deployment's options, scaleout/cluster.py `ReplicaPlan`); the replica actor, rank
0, takes bundle 0 and runs the engine. Rank r is an actor that takes bundle r whole, wherever Ray
placed it: on this node or, across nodes, another (strategy PACK: one node while they fit). Each
actor runs the same `run_worker` loop as a local worker process, binding gloo to its own node's
address and meeting rank 0 at its store, on rank 0's node address.

Liveness: a rank whose `run` call has ended (returned, raised, or its actor died) is dead; the
engine's next step raises naming it, as with local processes. Stop: rank 0's stop broadcast,
then the actors are killed once their calls have ended or STOP_TIMEOUT_S has passed. Actors are
never restarted (Ray's default): a replica whose rank died is replaced whole, by Ray Serve.

Only this module imports Ray; worker.py imports it only in a process that already has Ray.
"""

from __future__ import annotations

import ray
from ray.util import get_current_placement_group, get_node_ip_address
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tokenmill.distributed.worker import STOP_TIMEOUT_S, WorkerSpec, run_worker


def in_placement_group() -> bool:
    """Whether Ray is initialized here and this process is a task or actor of a placement group
    (asked first, since Ray's query would start a Ray of its own when it is not)."""
    return ray.is_initialized() and get_current_placement_group() is not None


def node_address() -> str:
    """This node's address, as the cluster's other nodes reach it."""
    return get_node_ip_address()


class TensorParallelRank:
    """One worker rank in a Ray actor."""

    def run(self, rank: int, spec: WorkerSpec, port: int) -> None:
        run_worker(rank, spec, port, node_address())


class RayRanks:
    """Ranks 1..K-1 in bundles 1..K-1 of the current placement group (worker.RankLauncher)."""

    def __init__(self, spec: WorkerSpec, port: int):
        self.group = get_current_placement_group()
        if self.group is None or self.group.bundle_count < spec.size:
            raise ValueError(f"{spec.size} tensor-parallel ranks need a placement group of "
                             f"{spec.size} bundles, one per rank")
        actor = ray.remote(TensorParallelRank)
        self.actors, self.calls = [], []  # rank r's at r - 1
        for rank in range(1, spec.size):
            bundle = self.group.bundle_specs[rank]
            if spec.device_type == "cuda" and not bundle.get("GPU"):
                raise ValueError(f"bundle {rank} of the placement group has no GPU for rank "
                                 f"{rank}: {bundle}")
            handle = actor.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=rank)).remote()
            self.actors.append(handle)
            self.calls.append(handle.run.remote(rank, spec, port))

    def describe(self) -> str:
        return f"actors in bundles 1..{len(self.actors)} of placement group {self.group.id.hex()}"

    def dead(self, timeout: float = 0) -> str | None:
        ended, _ = ray.wait(self.calls, num_returns=1, timeout=timeout, fetch_local=False)
        if not ended:
            return None
        rank = self.calls.index(ended[0]) + 1
        try:
            ray.get(ended[0])
            cause = "it returned"
        except Exception as exc:  # its actor died, or run_worker raised
            first_line = str(exc).partition("\n")[0]
            cause = f"{type(exc).__name__}: {first_line}"
        return (f"tensor-parallel worker rank {rank} (a Ray actor) ended ({cause}); the engine "
                f"cannot run without it")

    def stop(self) -> None:
        ray.wait(self.calls, num_returns=len(self.calls), timeout=STOP_TIMEOUT_S,
                 fetch_local=False)
        for actor in self.actors:
            ray.kill(actor)
