"""Sampler: the runner's last stage, from next-token logits [B, V] to one token per request.

Stages, in order (vLLM's sampler order; transformers' processors where they define the maths):
  1. `process_logits`: logit_bias, min_tokens masking, repetition penalty, presence/frequency.
  2. `compute_logprobs`: log_softmax of the processed logits, i.e. after bias and penalties but
     before temperature and truncation, so a logprob describes the model under the user's hard
     constraints and does not change with the sampling knobs (vLLM's "processed_logprobs").
  3. `sample`: greedy rows take the argmax; the others divide by temperature, then `filter_logits`
     (top_k, top_p, min_p), then an exponential race drawn from the request's own generator.
Every stage is batched: per-row parameters become [B] tensors once per call, and a stage that no
row asks for is skipped, so an all-greedy batch without penalties is a single argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.engine.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per request, in batch order
    logprobs: list[TokenLogprobs | None]  # one per request; None where logprobs were not asked


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size  # logits columns past it (padded embeddings) are never sampled
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        logits = logits[:, : self.vocab_size].float()  # [B, V]
        logits = process_logits(logits, requests, self.eos_token_ids)
        token_ids = sample(logits, requests).tolist()
        num_top = [r.sampling_params.logprobs for r in requests]
        return SamplerOutput(token_ids, compute_logprobs(logits, token_ids, num_top))


def process_logits(
    logits: Tensor, requests: list[Request], eos_token_ids: tuple[int, ...]
) -> Tensor:
    """Stage 1: logit_bias, min_tokens, repetition then presence/frequency penalties.

    Returns a new tensor [B, V] (the input is not modified); ids >= V in logit_bias or the stop
    ids are ignored rather than failing the whole batch.
    """
    vocab = logits.shape[1]
    device = logits.device
    params = [r.sampling_params for r in requests]

    bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items() if t < vocab]
    if bias:
        rows, cols, values = zip(*bias)
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = logits.index_put(index, torch.tensor(values, device=device), accumulate=True)

    # Until min_tokens exist, EOS (even with ignore_eos) and the stop ids cannot be sampled.
    banned = [
        (i, t)
        for i, (r, p) in enumerate(zip(requests, params))
        if len(r.output_token_ids) < p.min_tokens
        for t in {*eos_token_ids, *p.stop_token_ids}
        if t < vocab
    ]
    if banned:
        rows, cols = zip(*banned)
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits = logits.index_put(index, torch.tensor(float("-inf"), device=device))

    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rows:
        idx = torch.tensor(rows, device=device)
        token_ids = _padded([requests[i].all_token_ids for i in rows], vocab, device)  # [R, L]
        penalty = torch.tensor([params[i].repetition_penalty for i in rows], device=device)  # [R]
        penalized = apply_repetition_penalty(logits[idx], token_ids, penalty)
        logits = logits.index_copy(0, idx, penalized)

    rows = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if rows:
        idx = torch.tensor(rows, device=device)
        token_ids = _padded([requests[i].output_token_ids for i in rows], vocab, device)  # [R, L]
        presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)  # [R]
        frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)  # [R]
        penalized = apply_presence_frequency(logits[idx], token_ids, presence, frequency)
        logits = logits.index_copy(0, idx, penalized)
    return logits


def token_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """Occurrences of each id per row: token_ids [B, L] padded with `vocab_size` -> [B, V] float."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]  # the padding column is dropped


def apply_repetition_penalty(logits: Tensor, token_ids: Tensor, penalty: Tensor) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: every id seen in token_ids [B, L] (prompt
    and output, padded with V) has its logit divided by penalty [B] if positive, else multiplied."""
    seen = token_counts(token_ids, logits.shape[1]) > 0  # [B, V]
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def apply_presence_frequency(
    logits: Tensor, token_ids: Tensor, presence: Tensor, frequency: Tensor
) -> Tensor:
    """OpenAI penalties over the generated ids token_ids [B, L] (padded with V):
    logit -= presence * (count > 0) + frequency * count, with presence and frequency [B]."""
    counts = token_counts(token_ids, logits.shape[1])  # [B, V]
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def compute_logprobs(
    logits: Tensor, token_ids: list[int], num_top: list[int | None]
) -> list[TokenLogprobs | None]:
    """Stage 2: for rows with num_top[i] not None, the sampled token's logprob and the num_top[i]
    most likely (id, logprob), most likely first, under log_softmax(logits [B, V])."""
    out: list[TokenLogprobs | None] = [None] * len(num_top)
    rows = [i for i, k in enumerate(num_top) if k is not None]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    logprobs = logits[idx].log_softmax(dim=-1)  # [R, V]
    sampled = torch.tensor([token_ids[i] for i in rows], device=logits.device)  # [R]
    sampled_lp = logprobs.gather(1, sampled[:, None]).squeeze(1).tolist()
    k_max = min(max(num_top[i] for i in rows), logprobs.shape[1])
    top_lp, top_ids = logprobs.topk(k_max, dim=-1)  # [R, k_max], sorted descending
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = num_top[i]
        top = list(zip(top_ids[j][:k], top_lp[j][:k]))
        out[i] = TokenLogprobs(token_ids[i], sampled_lp[j], top)
    return out


def sample(logits: Tensor, requests: list[Request]) -> Tensor:
    """Stage 3: one token id per row [B]. temperature 0 is argmax (ties: lowest id); otherwise
    logits / temperature, filter_logits, then the exponential race argmax(probs / q), q ~ Exp(1),
    which draws token i with probability probs[i] and lets each row use its own generator."""
    token_ids = logits.argmax(dim=-1)  # [B]
    rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if not rows:
        return token_ids
    device = logits.device
    params = [requests[i].sampling_params for i in rows]
    idx = torch.tensor(rows, device=device)
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [R]
    scaled = logits[idx] / temperature[:, None]  # [R, V]
    top_k = top_p = min_p = None
    if any(p.top_k_enabled for p in params):
        top_k = torch.tensor([max(p.top_k, 0) for p in params], device=device)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(dim=-1)  # [R, V]
    q = _exponential(probs.shape, [requests[i].generator for i in rows], device)  # [R, V]
    return token_ids.index_copy(0, idx, (probs / q).argmax(dim=-1))


def filter_logits(
    logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, min_p: Tensor | None
) -> Tensor:
    """Set to -inf the tokens that top_k, then top_p, then min_p drop, per row of logits [B, V].

    top_k [B]: keep tokens whose logit is >= the k-th largest (ties at the boundary kept); 0: off.
    top_p [B]: keep the smallest most-likely-first set whose mass reaches top_p (vLLM); among
      equal probabilities the lower id comes first; at least one token; 1.0: off.
    min_p [B]: drop tokens whose probability < min_p * the largest probability; 0.0: off.
    A stage whose tensor is None is skipped.
    """
    vocab = logits.shape[1]
    if top_k is not None or top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
        drop = torch.zeros_like(sorted_logits, dtype=torch.bool)  # [B, V], in sorted order
        if top_k is not None:
            k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)  # [B]
            drop = sorted_logits < sorted_logits.gather(1, (k - 1)[:, None])
        if top_p is not None:
            probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # [B, V]
            mass_before = F.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))  # exclusive cumsum
            p = top_p[:, None]
            drop = drop | ((mass_before >= p) & (p < 1.0))
        logits = logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    if min_p is not None:
        probs = logits.softmax(dim=-1)  # [B, V]
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _exponential(
    shape: torch.Size, generators: list[torch.Generator | None], device: torch.device
) -> Tensor:
    """q ~ Exp(1) of `shape` [R, V]: a row with a generator draws from it alone (so its token does
    not depend on the rest of the batch); the other rows share one draw from the global RNG."""
    q = torch.empty(shape, device=device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        idx = torch.tensor(unseeded, device=device)
        q.index_copy_(0, idx, torch.empty(len(unseeded), shape[1], device=device).exponential_())
    for i, gen in enumerate(generators):
        if gen is not None:
            q[i] = torch.empty(shape[1], device=gen.device).exponential_(generator=gen)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)  # q = 0 would turn a dropped 0/0 into NaN


def _padded(seqs: list[list[int]], pad: int, device: torch.device) -> Tensor:
    """Token lists as a [B, max len] long tensor, padded with `pad`."""
    width = max(len(s) for s in seqs)
    rows = [s + [pad] * (width - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long, device=device)
