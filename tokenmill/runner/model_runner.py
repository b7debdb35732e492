"""Runner stage: owns the model and the paged KV cache; one SchedulerOutput in, sampled ids out.

`execute` builds the flat batch, runs the model over the cache, gathers the last hidden state of
each row whose chunk reaches its request's last known token, and samples those rows.

Under tensor parallelism every rank has a ModelRunner over its shard of the model and of the KV
cache (its KV heads only). Rank 0's (the engine's) hands each step's inputs to `broadcast` before
its own forward; a worker runs `forward` on the inputs it receives (distributed/worker.py). Only
rank 0 computes logits and samples. Every rank runs rank 0's linear plan (`share_plan`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.engine.outputs import RunnerOutput, SchedulerOutput
from tokenmill.models.default import tokenmill_home
from tokenmill.models.loader import LoadedModel
from tokenmill.runner.attention import CpuPagedAttentionMetadata, TorchAttentionMetadata
from tokenmill.runner.cpu_linear import can_pack, model_copy
from tokenmill.runner.linear_plan import LinearPlan, apply_plan, linear_shapes, plan_for
from tokenmill.runner.grammar_mask import GrammarMasks
from tokenmill.runner.input_batch import InputBatch, StepInputs
from tokenmill.runner.native import paged_decode_attention
from tokenmill.runner.sampler import Sampler


log = logging.getLogger(__name__)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token over all layers (what EngineConfig.resolve divides by);
    under tensor parallelism, over all ranks together."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * dtype.itemsize
    return per_layer * config.num_hidden_layers


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache_config: CacheConfig, device: torch.device,
                 dtype: torch.dtype, owns_model: bool = False, quantization: str = "none",
                 kv_dtype: torch.dtype | None = None,
                 broadcast: Callable[[StepInputs], object] | None = None,
                 share_plan: Callable[[Callable[[], LinearPlan]], LinearPlan] | None = None):
        """`owns_model`: nobody else holds `loaded`, so the CPU float32 path may replace its
        linears in place, freeing each plain weight as it goes, instead of in a copy.
        `quantization` (CPU float32 only): none packs the float32 linears for oneDNN; bf16,
        int8 and int4 run them as runner/linear_plan.py measures best on this CPU; all through
        one plan and `apply_plan`. `kv_dtype`: the KV cache's (None: the model's dtype).
        `broadcast`: tensor-parallel rank 0's, called with each step's inputs before the
        forward (None: one rank). `share_plan`: under tensor parallelism, given the function
        that measures (or reads) this rank's linear plan, the plan all ranks run: rank 0's,
        measured there while the workers wait (None: one rank, its own plan)."""
        if cache_config.num_blocks <= 0:
            raise ValueError("cache_config.num_blocks is unresolved; call EngineConfig.resolve")
        c = loaded.config
        self.model = loaded.model
        self.device = device
        self.block_size = cache_config.block_size
        self.sliding_window = cache_config.sliding_window
        self.broadcast = broadcast
        # One allocation, zeroed: padded gathers read slots that were never written. A
        # tensor-parallel rank holds its own Hkv / K heads of every block.
        self.kv_cache = torch.zeros(
            c.num_hidden_layers, 2, cache_config.num_blocks, cache_config.block_size,
            c.num_key_value_heads // loaded.shard.size, c.head_dim, dtype=kv_dtype or dtype,
            device=device,
        )  # [layers, K/V, num_blocks, block_size, Hkv, D]
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.sampler = Sampler(c.vocab_size, c.eos_token_ids)
        self.grammar_masks = GrammarMasks(c.vocab_size)
        # Decode attention: the native paged kernel on the CPU where it builds, else SDPA over
        # gathered keys (the same result; see runner/attention.py).
        self.attention_backend = (CpuPagedAttentionMetadata if device.type == "cpu"
                                  and paged_decode_attention() is not None
                                  else TorchAttentionMetadata)
        if can_pack(device, dtype):
            model = self.model if owns_model else model_copy(self.model)
            def measure() -> LinearPlan:
                return plan_for(quantization, linear_shapes(model),
                                tokenmill_home() / "cache" / "linear-plans")

            plan = measure() if share_plan is None else share_plan(measure)
            apply_plan(model, plan)
            self.model = model
            log.info("linears: %s", plan.describe())
        elif quantization != "none":
            raise ValueError(f"quantization {quantization!r} is for float32 models on the CPU, "
                             f"not {str(dtype).removeprefix('torch.')} on {device}")

    def reset_request_state(self) -> None:
        """Forget what the runner keeps per request across steps (the sampler's penalty state;
        a seeded request's generator lives on the Request): after a failed step."""
        self.sampler.reset()

    @torch.inference_mode()
    def execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        """Build the batch, start the grammar masks of its constrained rows, run the forward
        (the masks are computed meanwhile on the grammar thread), then sample."""
        if sched_out.is_empty:
            return RunnerOutput([], [], [])
        batch = InputBatch.build(sched_out.scheduled, self.device)
        requests = batch.sample_requests
        masks = self.grammar_masks.start(requests)
        if self.broadcast is not None:
            self.broadcast(batch.inputs)
        hidden = self.forward(batch.inputs)  # [T, H]
        if not requests:
            return RunnerOutput([], [], [])
        logits = self.model.compute_logits(hidden[batch.sample_indices])  # [S, V] float32
        out = self.sampler(logits, requests, None if masks is None else masks.result())
        return RunnerOutput([r.request_id for r in requests], list(out.token_ids),
                            list(out.logprobs))

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> Tensor:
        """Run the model over one step's inputs, writing their K/V into this rank's cache ->
        final hidden states [T, H] (after the last all-reduce: the same on every rank)."""
        input_ids, positions, attn = inputs.tensors(self.block_size, self.device,
                                                    self.sliding_window, self.attention_backend)
        return self.model(input_ids, positions, attn, self.kv_caches)
