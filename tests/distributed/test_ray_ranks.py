"""Tensor-parallel ranks placed by Ray (distributed/ray_ranks.py), on a local Ray of 4 CPUs: an
engine of 2 ranks in a Ray actor in bundle 0 of a placement group of 2 CPU bundles (as Ray Serve
places an engine replica), its rank 1 a Ray actor in bundle 1. It samples one rank's greedy
tokens, and a killed rank 1 fails its next step naming it. Outside a placement group the ranks
are not placed by Ray (the rule by which the engine then starts local processes)."""

from __future__ import annotations

import logging
import os
import signal

import psutil
import pytest
import torch
from server.server_live import descendants_running  # tests/ is on sys.path

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_state import COLLECTIVE_TIMEOUT
from tokenmill.distributed.worker import WorkerDiedError, in_ray_placement_group
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

ray = pytest.importorskip("ray", reason="Ray (tokenmill[scale]) is not installed: no placement "
                                        "groups to run ranks in")
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

PROMPTS = ("The mill stood by the river for three hundred years.",
           "Paris, Berlin, Madrid, Rome,")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# a dead rank is reported at once; a hung one only after the groups' timeout
AT_ONCE_S = COLLECTIVE_TIMEOUT.total_seconds() / 2


def engine_config(path, k: int) -> EngineConfig:
    """K ranks of one torch thread each."""
    return EngineConfig(model=str(path), dtype="float32", device="cpu", max_model_len=256,
                        kv_cache_gib=0.01, num_threads=k, tensor_parallel_size=k)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


class RemoteEngine:
    """An engine in a Ray actor, called as a local one (each call bounded by AT_ONCE_S)."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args), timeout=AT_ONCE_S)


@pytest.fixture
def placed_engine(local_ray, tiny_checkpoint):
    """An LLMEngine of 2 ranks in an actor in bundle 0 of a new placement group of 2 bundles, as
    Ray Serve places an engine replica; the group is removed afterwards."""
    group = placement_group([{"CPU": 1}] * 2, strategy="PACK")  # as ReplicaPlan reserves
    ray.get(group.ready(), timeout=60)
    engine = ray.remote(LLMEngine).options(
        num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True),
    ).remote(engine_config(tiny_checkpoint("qwen2"), 2))
    ray.get(engine.__ray_ready__.remote(), timeout=120)  # constructed: both ranks loaded
    yield RemoteEngine(engine)
    remove_placement_group(group)  # kills the engine's actor and its rank's


def generate(engine: LLMEngine | RemoteEngine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Greedy continuations of `prompts`, batched."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, GREEDY)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def rank_processes() -> list[psutil.Process]:
    """This test's Ray actors running a tensor-parallel rank (its local Ray's are children of
    this process)."""
    return descendants_running(os.getpid(), "TensorParallelRank")


def test_ranks_in_a_placement_group_sample_one_ranks_tokens(placed_engine, tiny_checkpoint,
                                                            real_tokenizer):
    prompts = [real_tokenizer.encode(p) for p in PROMPTS]
    threads = torch.get_num_threads()
    try:
        expected = generate(LLMEngine(engine_config(tiny_checkpoint("qwen2"), 1)), prompts)
    finally:
        torch.set_num_threads(threads)
    assert generate(placed_engine, prompts) == expected
    assert all(len(t) == GREEDY.max_tokens for t in expected.values())
    assert len(rank_processes()) == 1  # rank 1; rank 0 is the engine's actor
    placed_engine.shutdown()
    psutil.wait_procs(rank_processes(), timeout=AT_ONCE_S)
    assert rank_processes() == []  # its actor stopped (by the stop message, then killed)


def test_a_killed_rank_fails_the_next_step_naming_it(placed_engine, real_tokenizer):
    placed_engine.add_request("a", real_tokenizer.encode(PROMPTS[0]), GREEDY)
    placed_engine.step()
    [rank] = rank_processes()
    os.kill(rank.pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(a Ray actor\) ended \(Actor"):
        placed_engine.step()  # at once, not after the groups' timeout (AT_ONCE_S bounds it)
    placed_engine.shutdown()  # safe after a rank died


def test_a_process_with_ray_but_outside_a_placement_group_is_not_placed_by_ray(local_ray):
    assert ray.is_initialized() and not in_ray_placement_group()

