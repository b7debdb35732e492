"""How `tokenmill serve`'s replica flags become a ReplicaPlan and Ray Serve deployment options,
and that a server without them never imports Ray."""

import subprocess
import sys

import pytest

from tokenmill.cli import UsageError, build_parser, replica_plan
from tokenmill.scaleout.cluster import INGRESS_CPUS, ROUTER, ReplicaPlan, reservations, shortfall


def plan(*flags: str):
    return replica_plan(build_parser().parse_args(["serve", *flags]))


def test_no_replica_flags_no_plan_and_no_ray():
    assert plan() is None
    code = ("import sys, tokenmill.cli, tokenmill.server.app; "
            "tokenmill.cli.replica_plan(tokenmill.cli.build_parser().parse_args(['serve'])); "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_fixed_count_and_autoscaling_bounds_pass_through_to_ray_serve():
    fixed = plan("--replicas", "3", "--replica-threads", "2", "--max-num-seqs", "64")
    assert fixed == ReplicaPlan(3, 3, 16.0, 2, 64)
    options = fixed.deployment_options(block_size=16)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["max_ongoing_requests"] == 64
    assert options["ray_actor_options"] == {"num_cpus": 2}
    router = options["request_router_config"]
    assert (router.request_router_class, router.request_router_kwargs) == (ROUTER,
                                                                         {"block_size": 16})
    scaling = plan("--min-replicas", "1", "--max-replicas", "4",
                   "--target-ongoing-requests", "8").deployment_options(16)["autoscaling_config"]
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
        1, 4, 8.0)
    assert "num_replicas" not in plan("--min-replicas", "1", "--max-replicas", "4") \
        .deployment_options(16)


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "2", "--max-replicas", "4"], "not both"),
    (["--min-replicas", "2"], "needs both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "1 <= min (3) <= max (2)"),
    (["--replicas", "0"], "1 <= min (0)"),
])
def test_inconsistent_replica_flags_are_refused(flags, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(*flags)


def test_the_step_failure_bounds_of_serve_reach_each_engine_replica():
    """A replica's engine dies past --max-step-failures within --step-failure-window, as one
    process's does (then Ray Serve replaces it), not past AsyncLLM's defaults."""
    from tokenmill.cli import FAILURE_OPTIONS, given_options
    from tokenmill.config import EngineConfig
    from tokenmill.scaleout.cluster import engine_deployment

    args = build_parser().parse_args(["serve", "--replicas", "2", "--max-step-failures", "5",
                                      "--step-failure-window", "10"])
    failures = given_options(args, FAILURE_OPTIONS)
    assert failures == {"max_step_failures": 5, "step_failure_window_s": 10.0}
    app = engine_deployment(EngineConfig(model="m"), replica_plan(args), failures)
    config, bound = app._bound_deployment.init_args  # what each replica is constructed with
    assert bound == failures and config.num_threads == replica_plan(args).threads


def test_a_replica_of_k_ranks_reserves_a_placement_group_of_k_bundles():
    """Ray places a tensor-parallel replica's ranks: its actor in bundle 0, its workers in the
    others, packed on one node while they fit, each with its share of the replica's threads."""
    options = plan("--replicas", "2", "--replica-threads", "8", "--tensor-parallel-size",
                   "4").deployment_options(16)
    assert options["placement_group_bundles"] == [{"CPU": 2}] * 4
    assert options["placement_group_strategy"] == "PACK"
    assert options["ray_actor_options"] == {"num_cpus": 2}  # fits bundle 0
    gpus = plan("--replicas", "1", "--replica-threads", "2", "--tensor-parallel-size", "2",
                "--device", "cuda").deployment_options(16)
    assert gpus["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}] * 2
    assert gpus["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    one = plan("--replicas", "1", "--device", "cuda").deployment_options(16)
    assert "placement_group_bundles" not in one and one["ray_actor_options"]["num_gpus"] == 1


def test_the_replicas_reserve_every_rank_of_every_replica_of_every_model_and_each_ingress():
    replicas = plan("--min-replicas", "2", "--max-replicas", "5", "--replica-threads", "4",
                    "--tensor-parallel-size", "2", "--device", "cuda")
    least = reservations(replicas, models=3, ingress_replicas=2, replicas=2)
    assert least == [{"CPU": 2, "GPU": 1}] * (2 * 2 * 3) + [{"CPU": INGRESS_CPUS}] * 2
    most = reservations(replicas, models=3, ingress_replicas=0, replicas=5)
    assert most == [{"CPU": 2, "GPU": 1}] * (2 * 5 * 3)


def test_a_cluster_that_can_never_hold_the_replicas_is_named_and_one_that_can_is_not():
    two_gpu_nodes = [{"CPU": 8.0, "GPU": 2.0, "memory": 1e10}] * 2
    rank = {"CPU": 2, "GPU": 1}
    assert shortfall([rank] * 4 + [{"CPU": 1}] * 4, two_gpu_nodes) is None
    assert shortfall([rank] * 5, two_gpu_nodes) == ("they reserve 5 GPU in all, and the cluster "
                                                    "has 4")
    assert shortfall([{"CPU": 9}], two_gpu_nodes) == "no node has 9 CPU for one bundle"
    assert shortfall([rank], [{"CPU": 16.0}]) == "no node has 2 CPU, 1 GPU for one bundle"
    assert shortfall([], []) is None
