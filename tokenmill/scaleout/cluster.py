"""Engine replicas on Ray Serve: `tokenmill serve --replicas N` (or --min/--max-replicas).

Each served model becomes one deployment, `EngineReplica`, with N replicas (or autoscaling
between bounds on ongoing requests), each an engine with its own KV cache, routed by
`PrefixAwareRouter`. Its ingress is either this process (`deploy_engine`: one Ray Serve
application per model, reached through a RemoteEngine) or an ingress deployment in the same
application (tokenmill/ray_app.py, `--ingress-replicas`). With `--ray-address` the replicas go
on that cluster (`ray start --head` and its workers); without it a local Ray is started for
this process and stopped with it. Nothing here is imported without --replicas or
--ingress-replicas.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from tokenmill.config import EngineConfig
from tokenmill.models.loader import open_model
from tokenmill.scaleout.engine_replica import EngineReplica
from tokenmill.scaleout.remote_engine import RemoteEngine

log = logging.getLogger(__name__)

ROUTER = "tokenmill.scaleout.ray_router.PrefixAwareRouter"
INGRESS_CPUS = 1  # what each ingress replica reserves (tokenmill/ray_app.py)


@dataclass(frozen=True)
class ReplicaPlan:
    """How many engine replicas each model gets and what each holds."""

    min_replicas: int
    max_replicas: int  # == min_replicas: a fixed count, no autoscaling
    target_ongoing_requests: float  # per replica, what autoscaling steers to
    threads: int  # torch threads per replica, all its ranks together (the CPUs it reserves)
    max_ongoing_requests: int  # per replica, beyond which Ray Serve routes elsewhere or queues
    ranks: int = 1  # tensor-parallel ranks per replica (--tensor-parallel-size)
    gpu_per_rank: bool = False  # --device cuda: each rank reserves a GPU of its own

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max "
                             f"({self.max_replicas})")

    @property
    def rank_cpus(self) -> int:
        """What each rank reserves: its share of the replica's threads, as the engine divides
        them."""
        return max(1, self.threads // self.ranks)

    @property
    def rank_bundle(self) -> dict[str, int]:
        """What each rank reserves, in Ray's resource names."""
        return {"CPU": self.rank_cpus} | ({"GPU": 1} if self.gpu_per_rank else {})

    def deployment_options(self, block_size: int) -> dict:
        """Ray Serve's options of the engine deployment. A replica of K > 1 ranks reserves a
        placement group of K bundles, one per rank (its own actor takes bundle 0, its workers
        the others: distributed/ray_ranks.py), packed on one node while they fit."""
        scaling = ({"num_replicas": self.min_replicas} if self.min_replicas == self.max_replicas
                   else {"autoscaling_config": AutoscalingConfig(
                       min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                       target_ongoing_requests=self.target_ongoing_requests)})
        actor = {"num_cpus": self.rank_cpus} | ({"num_gpus": 1} if self.gpu_per_rank else {})
        placement = {} if self.ranks == 1 else {
            "placement_group_bundles": [self.rank_bundle] * self.ranks,
            "placement_group_strategy": "PACK"}
        return {**scaling, **placement, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": actor,
                "health_check_period_s": 5, "health_check_timeout_s": 30,
                "request_router_config": RequestRouterConfig(
                    request_router_class=ROUTER,
                    request_router_kwargs={"block_size": block_size})}


def start_cluster(address: str | None, plan: ReplicaPlan, models: int,
                  http: tuple[str, int] | None = None, ingress_replicas: int = 0) -> None:
    """Connect to the cluster at `address`, or start a local one sized for the plan's replicas
    of `models` models and the ingress replicas; start Ray Serve, with its HTTP proxy on `http`
    (host, port) when the ingress is a deployment (tokenmill/ray_app.py), else without (this
    process is the ingress).

    What the least replicas reserve is checked against the cluster first (`shortfall`): Ray
    Serve would wait for ever for resources that are not there. A local cluster (CPUs for the
    most replicas, the machine's GPUs) that lacks them, a GPU per rank on a machine with fewer
    say, is DeploymentFailedError; a cluster at `address` is warned about, since an autoscaler
    may yet add nodes."""
    if address is None:  # logical CPUs: the most replicas must fit, whatever the cores
        most = reservations(plan, models, ingress_replicas, plan.max_replicas)
        cpus = max(os.cpu_count() or 1, sum(bundle["CPU"] for bundle in most))
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        log.info("started a local Ray cluster with %d logical CPUs", cpus)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
        log.info("joined the Ray cluster at %s", address)
    missing = shortfall(reservations(plan, models, ingress_replicas, plan.min_replicas),
                        [node["Resources"] for node in ray.nodes() if node["Alive"]])
    if missing is not None and address is None:
        ray.shutdown()
        raise DeploymentFailedError(f"this machine cannot hold the replicas: {missing}")
    if missing is not None:
        log.warning("the cluster at %s cannot hold the replicas yet (%s): they wait until it "
                    "can; `ray status` shows what is pending", address, missing)
    if http is None:
        serve.start(proxy_location="Disabled")
    else:
        host, port = http
        serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})


def reservations(plan: ReplicaPlan, models: int, ingress_replicas: int,
                 replicas: int) -> list[dict]:
    """Every bundle the deployments reserve with `replicas` engine replicas per model: each rank
    of each engine replica of each model, and each ingress replica."""
    engines = [plan.rank_bundle] * (plan.ranks * replicas * models)
    return engines + [{"CPU": INGRESS_CPUS}] * ingress_replicas


def shortfall(wanted: list[dict], nodes: list[dict]) -> str | None:
    """Why the bundles `wanted` can never all be placed on nodes of these total resources, or
    None. Two exact tests, never a refusal of a placement that exists: a bundle that no node
    can hold, and a resource of which all the bundles want more than all the nodes have."""
    for bundle in wanted:
        if not any(all(node.get(name, 0) >= amount for name, amount in bundle.items())
                   for node in nodes):
            return f"no node has {_resources(bundle)} for one bundle"
    for name in sorted({name for bundle in wanted for name in bundle}):
        need = sum(bundle.get(name, 0) for bundle in wanted)
        have = sum(node.get(name, 0) for node in nodes)
        if need > have:
            return f"they reserve {need:g} {name} in all, and the cluster has {have:g}"
    return None


def _resources(bundle: dict) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())


def engine_deployment(config: EngineConfig, plan: ReplicaPlan, failures: dict,
                      name: str = "engine"):
    """The model's engine deployment, bound to its config and step-failure bounds (see
    EngineReplica): an Application to run or to bind into the ingress."""
    config = replace(config, num_threads=plan.threads)
    deployment = serve.deployment(EngineReplica, name=name).options(
        **plan.deployment_options(config.block_size))
    return deployment.bind(config, failures)


def deploy_engine(app_name: str, config: EngineConfig, plan: ReplicaPlan,
                  failures: dict) -> RemoteEngine:
    """Deploy (or update) the model's replicas and wait until they serve; its RemoteEngine.
    DeploymentFailedError if they cannot start (a replica's constructor raised)."""
    started = time.monotonic()
    opened = open_model(config.model, config.max_model_len)  # tokenizer and config: no weights
    log.info("starting %s: %s", app_name, _describe(plan))
    handle = run_application(engine_deployment(config, plan, failures), app_name,
                             route_prefix=None)
    engine = RemoteEngine(handle, handle.describe.remote().result(), opened.tokenizer,
                          opened.config)
    log.info("%s ready in %.1f s (context %d)", app_name, time.monotonic() - started,
             engine.max_model_len)
    return engine


class DeploymentFailedError(RuntimeError):
    """An application's replicas could not start; the message is the cause a replica's
    constructor raised (the last exception line of its traceback), not Ray Serve's report."""


def run_application(app, name: str, route_prefix: str | None):
    """`serve.run`, waiting until every replica is up; DeploymentFailedError if one cannot
    start (Ray Serve gives up after retrying; the application is deleted)."""
    try:
        return serve.run(app, name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        status = serve.status().applications.get(name)
        reports = [str(exc)] + ([d.message for d in status.deployments.values()]
                                if status is not None else [])
        serve.delete(name)
        raise DeploymentFailedError(_cause(reports)) from None


def _cause(reports: list[str]) -> str:
    """The last `SomeError: message` line of the reports (a replica's traceback), else the
    first report's first line."""
    causes = [line.strip() for report in reports for line in report.splitlines()
              if _EXCEPTION_LINE.match(line.strip())
              and not line.strip().startswith("RuntimeError: Traceback")]
    if causes:
        return causes[-1]
    return reports[0].strip().splitlines()[0] if reports[0].strip() else "unknown cause"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): \S")


def stop_cluster(app_names: list[str], local: bool) -> None:
    """Delete these applications (their replicas stop, draining); stop Ray Serve and Ray too
    when the cluster was this process's own, else just leave it."""
    for name in app_names:
        serve.delete(name)
    if local:
        serve.shutdown()
    ray.shutdown()


def _describe(plan: ReplicaPlan) -> str:
    count = (f"{plan.min_replicas} replicas" if plan.min_replicas == plan.max_replicas else
             f"{plan.min_replicas} to {plan.max_replicas} replicas at "
             f"{plan.target_ongoing_requests:g} ongoing requests each")
    return f"{count}, {plan.threads} threads each, prefix-aware routing"
