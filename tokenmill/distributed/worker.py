"""Tensor parallelism, execution: rank 0's handle on its workers, and the workers' loop.

K ranks, as vLLM's executors: rank 0 is the engine's own process (scheduler, sampler,
detokenizer, everything as with one rank); `TensorParallelWorkers` starts ranks 1..K-1 with one
of two launchers (`RankLauncher`), chosen by one rule (`in_ray_placement_group`):
- if Ray is initialized in the engine's process and that process runs in a placement group
  (`ray.util.get_current_placement_group()` is not None: an engine replica on Ray Serve, whose
  deployment reserved K bundles, scaleout/cluster.py `ReplicaPlan`): Ray actors in bundles 1..K-1,
  which Ray may put on other nodes (ray_ranks.RayRanks). The ranks meet at rank 0's node
  address, each binding gloo to its own node's.
- otherwise: local processes, with torch.multiprocessing (spawn), `RankProcesses`, meeting at
  127.0.0.1 (LOCAL_HOST).
Only ray_ranks.py imports Ray, and it is imported only by a process that already has Ray.

Every rank opens the model, keeps its shard of it (`load_rank`) and of the KV cache, and builds
a ModelRunner over them exactly as rank 0 does, except that on the CPU the workers run rank 0's
linear plan, the first thing it broadcasts (`share_plan`), instead of measuring their own. Then
each step:

    rank 0:   schedule -> StepInputs -> broadcast -> forward (all-reduces) -> logits -> sample
    rank r:                     receive ----------> forward (all-reduces)

After the last all-reduce the hidden state is the same on every rank, so only rank 0 computes
logits. A broadcast of None ends the workers (`shutdown`).

Faults. A worker that dies closes its connections: rank 0's next broadcast or all-reduce raises
at once, the engine's step fails and `check` names the dead rank and why it ended (its exit code,
or its actor's error), waiting up to DEATH_NOTICE_S for the death to be known (Ray learns of an
actor's a few milliseconds after its connections close; of a lost node's, only after its health
checks, and then the collective's own error is raised). Under tensor parallelism a failed step is
fatal to the engine (the ranks may be out of step), so the server's engine is declared dead and
it exits (status 3). A rank that hangs makes the others' all-reduce raise after
COLLECTIVE_TIMEOUT. If rank 0 dies, the workers' wait for the next step raises and they exit;
they never outlive rank 0 either: local processes are daemons of its interpreter, Ray actors are
owned by its actor, and Ray ends an actor's actors with it.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

import torch
import torch.multiprocessing as mp

from tokenmill.config import CacheConfig
from tokenmill.distributed.parallel_linear import TensorShard, install_all_reduce
from tokenmill.distributed.parallel_state import (COLLECTIVE_TIMEOUT, LOCAL_HOST,
                                                  TensorParallelGroup, connect, join_store,
                                                  serve_store)
from tokenmill.models.loader import LoadedModel, OpenedModel, load_weights, open_model
from tokenmill.runner.input_batch import StepInputs
from tokenmill.runner.linear_plan import LinearPlan
from tokenmill.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10  # for a worker to exit after the stop message, before it is terminated
DEATH_NOTICE_S = 5  # after a failed collective, for a worker's death to be known (see Faults)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker (a process or a Ray actor) ended while the engine needed it."""


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its rank exactly as rank 0 builds its own (all resolved by
    rank 0, so that no rank decides anything for itself)."""

    model: str  # the model spec rank 0 opened
    max_model_len: int | None
    size: int  # K ranks
    dtype: torch.dtype
    device_type: str  # cpu, or cuda: rank r runs on cuda:r
    num_threads: int  # torch threads of each rank (CPU)
    cache: CacheConfig  # resolved: every rank's cache has these blocks, with its own KV heads
    quantization: str  # resolved (never auto)
    kv_dtype: torch.dtype
    log_level: int  # rank 0's, for the workers' logs
    store_host: str = LOCAL_HOST  # where rank 0 serves the rendezvous, as the workers reach it
    placed_by_ray: bool = False  # each rank a Ray actor with a GPU of its own (its cuda:0)


def rank_device(spec: WorkerSpec, rank: int) -> torch.device:
    """Local ranks share the host's GPUs (rank r on cuda:r); a Ray actor sees only its own."""
    if spec.device_type != "cuda":
        return torch.device(spec.device_type)
    return torch.device("cuda", 0 if spec.placed_by_ray else rank)


class RankLauncher(Protocol):
    """How ranks 1..K-1 run: started by the constructor, given the WorkerSpec and the port of
    rank 0's store (each then runs `run_worker`), watched, and stopped. Rank r is the r-th
    worker; a rank is dead once its `run_worker` has ended, whether it returned or not."""

    def describe(self) -> str:
        """Where the workers run, for the log."""

    def dead(self, timeout: float = 0) -> str | None:
        """Why the first rank that ended did, naming the rank; None if all still run after
        waiting up to `timeout` s for one to end."""

    def stop(self) -> None:
        """Give the workers STOP_TIMEOUT_S to end (after the stop message), then end them."""


def launch_ranks(spec: WorkerSpec, port: int) -> RankLauncher:
    """Start ranks 1..K-1 with the launcher the module docstring's rule chose for `spec`."""
    if spec.placed_by_ray:
        from tokenmill.distributed.ray_ranks import RayRanks

        return RayRanks(spec, port)
    return RankProcesses(spec, port)


class RankProcesses:
    """Ranks 1..K-1 as local processes (torch.multiprocessing, spawn), daemons: they never
    outlive this interpreter."""

    def __init__(self, spec: WorkerSpec, port: int):
        context = mp.get_context("spawn")
        self.processes = [context.Process(target=run_worker,
                                          args=(rank, spec, port, LOCAL_HOST),
                                          name=f"tokenmill-tp{rank}", daemon=True)
                          for rank in range(1, spec.size)]
        for process in self.processes:
            process.start()

    def describe(self) -> str:
        return "pids " + ", ".join(str(p.pid) for p in self.processes)

    def dead(self, timeout: float = 0) -> str | None:
        multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout)
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return (f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with "
                        f"code {process.exitcode}; the engine cannot run without it")
        return None

    def stop(self) -> None:
        """Wait for each to exit, then terminate, then kill what is left."""
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()


def in_ray_placement_group() -> bool:
    """The launcher rule: whether Ray places this engine's workers (see the module docstring).
    Never imports Ray: a process that has not imported it runs in no placement group."""
    if "ray" not in sys.modules:
        return False
    from tokenmill.distributed.ray_ranks import in_placement_group

    return in_placement_group()


def engine_host(placed_by_ray: bool) -> str:
    """Rank 0's address for the rendezvous and gloo: its node's, when Ray places the ranks."""
    if not placed_by_ray:
        return LOCAL_HOST
    from tokenmill.distributed.ray_ranks import node_address

    return node_address()


def load_rank(opened: OpenedModel, group: TensorParallelGroup, dtype: torch.dtype,
              device: torch.device) -> LoadedModel:
    """This rank's shard of the opened model, loaded, with its residual branches summed over
    the ranks."""
    loaded = load_weights(opened.sharded(TensorShard(group.rank, group.size)), dtype, device)
    install_all_reduce(loaded.model, group.all_reduce)
    return loaded


class TensorParallelWorkers:
    """Rank 0's side: starts ranks 1..K-1, sends them each step, checks on them, stops them."""

    def __init__(self, spec: WorkerSpec):
        """Start the workers and join the groups with them (returns once all K have joined;
        each then loads its shard, which `wait_ready` waits for)."""
        self.spec = spec
        self._stopped = False
        # the rendezvous, kept while the workers run
        self._store = serve_store(spec.store_host, spec.size)
        self.ranks: RankLauncher = launch_ranks(spec, self._store.port)
        try:
            self._wait_for("started", "start")
            self.group = connect(self._store, 0, spec.size, rank_device(spec, 0),
                                 spec.store_host)
        except BaseException as exc:
            self._fail(exc)
        log.info("tensor parallelism: %d ranks, workers' %s, %d torch threads each",
                 spec.size, self.ranks.describe(), spec.num_threads)

    def _wait_for(self, stage: str, doing: str) -> None:
        """Wait until every worker has set its `stage` key in the store (started: it reached
        the store; loaded: its shard and KV cache are built), so that one failing on the way
        (an import, the main module under spawn, its shard) is reported now, not after the
        groups' timeout."""
        keys = [f"{stage}/{rank}" for rank in range(1, self.spec.size)]
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        while not self._store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel workers did not {doing} within "
                                   f"{COLLECTIVE_TIMEOUT.total_seconds():g} s")
            time.sleep(0.05)

    def wait_ready(self) -> None:
        """Return once every worker has built its rank; raise (and stop them) if one failed."""
        try:
            self.group.barrier()
        except BaseException as exc:
            self._fail(exc)

    def share_plan(self, measure: Callable[[], LinearPlan]) -> LinearPlan:
        """Rank 0's linear plan, sent to each worker (`run_worker`): every rank runs the same
        kernels at the same row counts. It is measured once every worker has built its shard
        and waits for the plan, so that no other rank's work shares the cores meanwhile."""
        self._wait_for("loaded", "load their shards")
        plan = measure()
        self.broadcast(plan)
        return plan

    def broadcast(self, inputs: StepInputs | LinearPlan) -> None:
        """Send one step's inputs (rank 0 then runs the same forward), or the linear plan, to
        every worker."""
        try:
            self.group.broadcast(inputs)
        except RuntimeError as exc:
            self.check(exc)
            raise

    def check(self, cause: BaseException | None = None) -> None:
        """Raise WorkerDiedError, naming the rank and why it ended, if a worker has. After a
        failure (`cause`, a collective's maybe) wait up to DEATH_NOTICE_S for a death to be
        known; without one, only look."""
        dead = self.ranks.dead(0 if cause is None else DEATH_NOTICE_S)
        if dead is not None:
            raise WorkerDiedError(dead) from cause

    def shutdown(self) -> None:
        """Stop every worker: the stop message, then terminate those still running. Idempotent,
        and safe after a worker died or before the groups were joined."""
        if self._stopped:
            return
        self._stopped = True
        if hasattr(self, "group") and self.ranks.dead() is None:
            try:
                self.group.broadcast(None)
            except RuntimeError:
                pass  # a rank left meanwhile: stopped below
        self.ranks.stop()

    def _fail(self, cause: BaseException) -> NoReturn:
        """Stop the workers after a failure to start them, naming a dead one if there is."""
        dead = self.ranks.dead(DEATH_NOTICE_S)
        self.shutdown()
        if dead is not None:
            raise WorkerDiedError(dead) from cause
        raise cause


def run_worker(rank: int, spec: WorkerSpec, port: int, host: str) -> None:
    """A worker's life (its own process): join the groups (over this rank's address `host`),
    build this rank's model and KV cache, then run the forward of every step rank 0 broadcasts
    until it sends None."""
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    device = rank_device(spec, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(spec.num_threads)
    store = join_store(spec.store_host, port, spec.size)
    store.set(f"started/{rank}", str(os.getpid()))
    group = connect(store, rank, spec.size, device, host)
    loaded = load_rank(open_model(spec.model, spec.max_model_len), group, spec.dtype, device)

    def rank_0s_plan(_measure) -> LinearPlan:
        store.set(f"loaded/{rank}", str(os.getpid()))  # rank 0 may measure now
        plan = group.broadcast()
        if plan is None:  # rank 0 failed before measuring: its stop message
            raise _StoppedBeforeReady
        return plan

    try:
        runner = ModelRunner(loaded, spec.cache, device, spec.dtype, owns_model=True,
                             quantization=spec.quantization, kv_dtype=spec.kv_dtype,
                             share_plan=rank_0s_plan)
        log.info("rank %d of %d ready (pid %d)", rank, spec.size, os.getpid())
        group.barrier()
        while (inputs := group.broadcast()) is not None:
            runner.forward(inputs)
    except _StoppedBeforeReady:
        log.info("rank %d stops: rank 0 stopped before the engine was ready", rank)
    except RuntimeError as exc:  # rank 0 left, or a collective failed: this rank cannot go on
        log.error("rank %d stops: %s", rank, exc)
        raise SystemExit(1) from None


class _StoppedBeforeReady(Exception):
    """Rank 0 sent its stop message where a worker waited for the linear plan."""
