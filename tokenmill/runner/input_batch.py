"""Runner stage, step 1: SchedulerOutput -> one flat batch of tensors.

Every scheduled chunk contributes the tokens [num_computed_tokens, num_computed_tokens + n) of its
request. INVARIANT: this runs before the scheduler advances num_computed_tokens, and the
request's block_ids already cover num_computed_tokens + n tokens (under a sliding window, those
before the window are NULL_BLOCK, which attention never reads). Rows with one new token (decodes)
are placed first, so attention can handle them as one padded batch.

What the forward needs of a step is `StepInputs`, plain lists: under tensor parallelism rank 0
sends them to every worker, and each rank makes its own tensors from them (`StepInputs.tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenmill.engine.outputs import ScheduledRequest
from tokenmill.engine.request import Request
from tokenmill.runner.attention import AttentionMetadata


@dataclass
class StepInputs:
    """One step's forward inputs, R rows in batch order (query length 1 first)."""

    input_ids: list[int]  # [T] the rows' new tokens, concatenated
    positions: list[int]  # [T] each one's position in its request
    query_lens: list[int]  # [R] new tokens of each row
    context_lens: list[int]  # [R] its tokens in the cache after this step (computed + new)
    block_tables: list[list[int]]  # [R] its KV block ids, covering context_lens

    def tensors(self, block_size: int, device: torch.device, sliding_window: int | None,
                backend: type[AttentionMetadata]) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """(input_ids [T] int64, positions [T] int64, the step's attention metadata)."""
        attn = backend.build(query_lens=self.query_lens, context_lens=self.context_lens,
                             block_tables=self.block_tables, block_size=block_size,
                             device=device, sliding_window=sliding_window)
        return (torch.tensor(self.input_ids, dtype=torch.long, device=device),
                torch.tensor(self.positions, dtype=torch.long, device=device), attn)


@dataclass
class InputBatch:
    inputs: StepInputs  # what the forward reads
    sample_indices: Tensor  # [S] int64: flat index of the last token of each sampling row
    sample_requests: list[Request]  # the S requests sampled this step, in batch order

    @classmethod
    def build(cls, scheduled: list[ScheduledRequest], device: torch.device) -> InputBatch:
        # Batch order: query length 1 first (the attention backend's contract). The scheduler
        # already emits this order; sorting (stable) keeps the runner correct on its own.
        rows = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        input_ids: list[int] = []
        positions: list[int] = []
        sample_indices: list[int] = []
        for s in rows:
            start = s.request.num_computed_tokens
            end = start + s.num_new_tokens
            input_ids += token_slice(s.request, start, end)
            positions += range(start, end)
            if s.samples:
                sample_indices.append(len(input_ids) - 1)
        inputs = StepInputs(
            input_ids=input_ids,
            positions=positions,
            query_lens=[s.num_new_tokens for s in rows],
            context_lens=[s.request.num_computed_tokens + s.num_new_tokens for s in rows],
            block_tables=[s.request.block_ids for s in rows],
        )
        return cls(
            inputs=inputs,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
            sample_requests=[s.request for s in rows if s.samples],
        )


def token_slice(req: Request, start: int, end: int) -> list[int]:
    """req.all_token_ids[start:end] without concatenating the whole prompt and output."""
    p = req.num_prompt_tokens
    if end <= p:
        return req.prompt_token_ids[start:end]
    if start >= p:
        return req.output_token_ids[start - p:end - p]
    return req.prompt_token_ids[start:] + req.output_token_ids[:end - p]
