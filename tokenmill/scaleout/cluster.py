"""Engine replicas on Ray Serve: `tokenmill serve --replicas N` (or --min/--max-replicas).

This process stays the ingress (the FastAPI app: auth, limits, ledger, web); each served model
becomes a Ray Serve application of one deployment, `EngineReplica`, with N replicas (or
autoscaling between bounds on ongoing requests), each an engine with its own KV cache, routed by
`PrefixAwareRouter`. With `--ray-address` the replicas go on that cluster (`ray start --head`
and its workers); without it a local Ray is started for this process and stopped with it.
Several ingress processes may share one cluster's deployments (`--ray-address` and the same
model list) and, with --redis and a PostgreSQL store, their limits and ledger. Nothing here is
imported without --replicas.
"""

from __future__ import annotations

import logging
import os
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


@dataclass(frozen=True)
class ReplicaPlan:
    """How many engine replicas each model gets and what each holds."""

    min_replicas: int
    max_replicas: int  # == min_replicas: a fixed count, no autoscaling
    target_ongoing_requests: float  # per replica, what autoscaling steers to
    threads: int  # torch threads per replica (and the CPUs it reserves in Ray)
    max_ongoing_requests: int  # per replica, beyond which Ray Serve routes elsewhere or queues

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max "
                             f"({self.max_replicas})")

    def deployment_options(self, block_size: int) -> dict:
        scaling = ({"num_replicas": self.min_replicas} if self.min_replicas == self.max_replicas
                   else {"autoscaling_config": AutoscalingConfig(
                       min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                       target_ongoing_requests=self.target_ongoing_requests)})
        return {**scaling, "max_ongoing_requests": self.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": self.threads},
                "health_check_period_s": 5, "health_check_timeout_s": 30,
                "request_router_config": RequestRouterConfig(
                    request_router_class=ROUTER,
                    request_router_kwargs={"block_size": block_size})}


def start_cluster(address: str | None, plan: ReplicaPlan) -> None:
    """Connect to the cluster at `address`, or start a local one sized for the plan; start Ray
    Serve without its HTTP proxy (this process is the ingress)."""
    if address is None:  # logical CPUs: the replicas' reservations must fit, whatever the cores
        cpus = max(os.cpu_count() or 1, plan.max_replicas * plan.threads)
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        log.info("started a local Ray cluster with %d logical CPUs", cpus)
    else:
        ray.init(address=address, logging_level=logging.WARNING)
        log.info("joined the Ray cluster at %s", address)
    serve.start(proxy_location="Disabled")


def deploy_engine(app_name: str, config: EngineConfig, plan: ReplicaPlan) -> RemoteEngine:
    """Deploy (or update) the model's replicas and wait until they serve; its RemoteEngine."""
    started = time.monotonic()
    config = replace(config, num_threads=plan.threads)
    opened = open_model(config.model, config.max_model_len)  # tokenizer and config: no weights
    deployment = serve.deployment(EngineReplica, name="engine").options(
        **plan.deployment_options(config.block_size))
    log.info("starting %s: %s", app_name, _describe(plan))
    handle = serve.run(deployment.bind(config), name=app_name, route_prefix=None)
    engine = RemoteEngine(handle, app_name, opened.tokenizer, opened.config)
    log.info("%s ready in %.1f s (context %d)", app_name, time.monotonic() - started,
             engine.max_model_len)
    return engine


def stop_cluster() -> None:
    serve.shutdown()
    ray.shutdown()


def _describe(plan: ReplicaPlan) -> str:
    count = (f"{plan.min_replicas} replicas" if plan.min_replicas == plan.max_replicas else
             f"{plan.min_replicas} to {plan.max_replicas} replicas at "
             f"{plan.target_ongoing_requests:g} ongoing requests each")
    return f"{count}, {plan.threads} threads each, prefix-aware routing"
