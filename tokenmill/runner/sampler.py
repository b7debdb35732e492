"""Sampler: the runner's last stage, from next-token logits [B, V] to one token per request.

Stages, in order (vLLM's sampler order; transformers' processors where they define the maths):
  0. the grammar masks of constrained rows (runner/grammar_mask.py): disallowed tokens -> -inf.
  1. `process_logits`: logit_bias, min_tokens masking, repetition penalty, presence/frequency.
  2. `compute_logprobs`: log_softmax of the processed logits, i.e. after bias and penalties but
     before temperature and truncation, so a logprob describes the model under the user's hard
     constraints and does not change with the sampling knobs (vLLM's "processed_logprobs").
  3. `sample`: greedy rows take the argmax; the others divide by temperature, then `filter_logits`
     (top_k, top_p, min_p), then an exponential race drawn from the request's own generator.
Every stage is batched: per-row parameters become [B] tensors once per call, and a stage that no
row asks for is skipped, so an all-greedy batch without penalties is a single argmax. The
penalties are runner/penalties.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.engine.request import Request
from tokenmill.runner.grammar_mask import apply_bitmask
from tokenmill.runner.penalties import PenaltyCache, apply_penalties


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per request, in batch order
    logprobs: list[TokenLogprobs | None]  # one per request; None where logprobs were not asked


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size  # logits columns past it (padded embeddings) are never sampled
        self.eos_token_ids = tuple(eos_token_ids)
        self.penalty_cache = PenaltyCache()

    def reset(self) -> None:
        """Drop every request's penalty state (after a failed step may have left some half
        updated); each request's is rebuilt from its tokens the next time it is sampled."""
        self.penalty_cache = PenaltyCache()

    def __call__(self, logits: Tensor, requests: list[Request],
                 bitmask: Tensor | None = None) -> SamplerOutput:
        """`bitmask` [B, W]: the packed grammar masks (GrammarMasks), None when no row has one."""
        logits = logits[:, : self.vocab_size].float()  # [B, V]
        if bitmask is None:
            logits = process_logits(logits, requests, self.eos_token_ids, self.penalty_cache)
        else:
            logits = self._constrained_logits(logits, requests, bitmask)
        token_ids = sample(logits, requests).tolist()
        num_top = [r.sampling_params.logprobs for r in requests]
        return SamplerOutput(token_ids, compute_logprobs(logits, token_ids, num_top))


    def _constrained_logits(self, logits: Tensor, requests: list[Request],
                            bitmask: Tensor) -> Tensor:
        """Stage 0 then stage 1. The grammar wins over min_tokens: a row whose grammar allows
        only tokens that min_tokens or the penalties took away (EOS, once the grammar is
        complete) keeps its grammar-masked logits, so it can still end validly."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        masked = apply_bitmask(logits, bitmask, rows)  # [B, V]
        processed = process_logits(masked, requests, self.eos_token_ids, self.penalty_cache)
        index = torch.tensor(rows, device=logits.device)  # [R]
        dead = processed[index].isneginf().all(dim=-1)  # [R]
        if dead.any():
            stuck = index[dead]
            processed = processed.index_copy(0, stuck, masked[stuck])
        return processed


def process_logits(
    logits: Tensor,
    requests: list[Request],
    eos_token_ids: tuple[int, ...],
    cache: PenaltyCache | None = None,
) -> Tensor:
    """Stage 1: logit_bias, min_tokens, repetition then presence/frequency penalties.

    Returns a new tensor [B, V], or the input itself where nothing applies (the input is never
    modified); ids >= V in logit_bias, the stop ids or the token ids are ignored rather than
    failing the whole batch. `cache` carries the penalties' per-request state from one call to
    the next; without one it is built afresh.
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

    return apply_penalties(logits, requests, PenaltyCache() if cache is None else cache)


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
    """Stage 3: one token id per row [B]. A greedy row is argmax (ties: lowest id); otherwise
    logits / temperature, filter_logits, then the exponential race argmax(probs / q), q ~ Exp(1),
    which draws token i with probability probs[i] and lets each row use its own generator."""
    rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
    if not rows:
        return logits.argmax(dim=-1)
    device = logits.device
    params = [requests[i].sampling_params for i in rows]
    idx = None if len(rows) == len(requests) else torch.tensor(rows, device=device)  # [R]
    temperature = torch.tensor([p.temperature for p in params], device=device)  # [R]
    scaled = (logits if idx is None else logits[idx]) / temperature[:, None]  # [R, V]
    # A logit that overflowed (a tiny repetition_penalty, then temperature) becomes the largest
    # float, so softmax gives its row a point mass there instead of NaN.
    scaled = scaled.clamp_max_(torch.finfo(scaled.dtype).max)
    top_k = top_p = min_p = None
    if any(p.top_k_enabled for p in params):
        # A top_k past the vocabulary keeps it all (clamped here: the request may give any
        # integer, even one past int64).
        vocab = logits.shape[-1]
        top_k = torch.tensor([min(max(p.top_k, 0), vocab) for p in params], device=device)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(dim=-1)  # [R, V]
    q = _exponential(probs.shape, [requests[i].generator for i in rows], device)  # [R, V]
    drawn = (probs / q).argmax(dim=-1)  # [R]
    return drawn if idx is None else logits.argmax(dim=-1).index_copy(0, idx, drawn)


def filter_logits(
    logits: Tensor, top_k: Tensor | None, top_p: Tensor | None, min_p: Tensor | None
) -> Tensor:
    """Set to -inf the tokens that top_k, then top_p, then min_p drop, per row of logits [B, V].

    top_k [B]: keep tokens whose logit is >= the k-th largest (ties at the boundary kept); 0: off.
    top_p [B]: keep the smallest most-likely-first set whose mass reaches top_p (vLLM); among
      equal probabilities the lower id comes first; at least one token; 1.0: off.
    min_p [B]: drop tokens whose probability < min_p * the largest probability; 0.0: off.
    A stage whose tensor is None is skipped. No stage sorts the whole vocabulary (see _top_p_cut).
    """
    vocab = logits.shape[1]
    if top_k is not None:
        k = top_k.clamp(1, vocab)  # [B]
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])  # [B, 1]
        kth = kth.masked_fill(top_k[:, None] <= 0, float("-inf"))  # rows without top_k keep all
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        value, last_id = _top_p_cut(logits, top_p)  # [B, 1] each
        ids = torch.arange(vocab, device=logits.device)  # [V]
        drop = (logits < value) | ((logits == value) & (ids > last_id))  # [B, V]
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p is not None:
        probs = logits.softmax(dim=-1)  # [B, V]
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values  # [B, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


TOP_P_WIDTH = 256  # candidates first looked at per top_p row; x4 for the rows it does not settle


def _top_p_cut(logits: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """The last token top_p keeps in each row of logits [B, V], as its logit and id [B, 1] each:
    the kept set is every logit above it plus its ties up to its id.

    Works on the `width` most likely tokens in most-likely-first order (ties: lower id first)
    instead of a full sort: the kept prefix is final once the mass reaches top_p at a logit
    strictly above the smallest candidate (so no tie of it was left out), or the candidates hold
    every finite logit or the whole vocabulary; unsettled rows retry with 4x the width.
    """
    vocab = logits.shape[1]
    probs = logits.softmax(dim=-1)  # [B, V]
    value = torch.full_like(top_p, float("-inf"))[:, None]  # [B, 1]; -inf, V: keep everything
    last_id = torch.full_like(value, vocab, dtype=torch.long)  # [B, 1]
    todo = (top_p < 1.0).nonzero().squeeze(1)  # [P], rows still to settle
    width = min(vocab, TOP_P_WIDTH)
    while todo.numel():
        rows = logits if todo.numel() == logits.shape[0] else logits[todo]  # [P, V]
        vals, ids = _sorted_head(rows, width)  # [P, W]
        mass_before = F.pad(probs[todo[:, None], ids].cumsum(dim=-1)[:, :-1], (1, 0))  # [P, W]
        # At least the first candidate, even for a top_p that is 0 in float32 (5e-324, say).
        last = (mass_before < top_p[todo, None]).sum(dim=-1, keepdim=True).sub_(1).clamp_min_(0)
        cut, smallest = vals.gather(1, last), vals[:, -1:]  # [P, 1]
        settled = ((last < width - 1) & (cut > smallest)) | (smallest == float("-inf"))
        settled = (settled | (width == vocab)).squeeze(1)  # [P]
        value[todo[settled]] = cut[settled]
        last_id[todo[settled]] = ids.gather(1, last)[settled]
        todo, width = todo[~settled], min(vocab, 4 * width)
    return value, last_id


def _sorted_head(logits: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The `width` largest logits of each row [B, W] and their ids, largest first, equal logits
    by increasing id (the order of a stable descending sort)."""
    if width == logits.shape[1]:
        return logits.sort(dim=-1, descending=True, stable=True)
    vals, ids = logits.topk(width, dim=-1)  # [B, W], ties in no particular order
    ids, order = ids.sort(dim=-1)
    vals, order = vals.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return vals, ids.gather(1, order)


def _exponential(
    shape: torch.Size, generators: list[torch.Generator | None], device: torch.device
) -> Tensor:
    """q ~ Exp(1) of `shape` [R, V]: a row with a generator draws from it alone (so its token does
    not depend on the rest of the batch); the other rows take -log(U), U ~ Uniform[0, 1) from the
    global RNG, several times cheaper on CPU than exponential_ for the same distribution."""
    q = torch.empty(shape, device=device)  # [R, V]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        q.uniform_().log_().neg_()
    elif unseeded:
        draw = torch.rand(len(unseeded), shape[1], device=device).log_().neg_()  # [U, V]
        q.index_copy_(0, torch.tensor(unseeded, device=device), draw)
    for i, gen in enumerate(generators):
        if gen is not None:
            q[i] = torch.empty(shape[1], device=gen.device).exponential_(generator=gen)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)  # q = 0 would turn a dropped 0/0 into NaN
