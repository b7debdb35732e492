"""The penalties on generated text: repetition (transformers' rule, over prompt and output ids)
and OpenAI's presence and frequency penalties (over output ids, by count).

A `PenaltyCache` follows each request's tokens incrementally (`SeenTokens`), so a step costs
O(new tokens) per request in Python, not O(sequence length); the penalties themselves touch only
the entries of ids a row has seen, through 1-D index_select / index_copy_ on the flat logits.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from tokenmill.engine.request import Request


def apply_penalties(logits: Tensor, requests: list[Request], cache: PenaltyCache) -> Tensor:
    """Repetition, then presence/frequency penalties, on logits [B, V], row i for requests[i].

    Returns a new tensor, or `logits` itself when no row asks for a penalty. Only the rows that
    ask read their SeenTokens; ids >= V are ignored."""
    vocab = logits.shape[1]
    device = logits.device
    params = [r.sampling_params for r in requests]
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    counted = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if not repeated and not counted:
        return logits
    seen = {i: cache.get(requests[i], vocab, device) for i in {*repeated, *counted}}
    if repeated:
        ids = [(i, t) for i in repeated for t in (seen[i].prompt_ids, seen[i].output_ids)]
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)  # [B]
        # A penalty that underflows float32 (5e-324, say) would make 0 / 0 = NaN.
        penalty.clamp_min_(torch.finfo(penalty.dtype).tiny)
        logits = _penalize_repetition(logits, _flat_index(ids, vocab), penalty)
    if counted:
        flat = _flat_index([(i, seen[i].output_ids) for i in counted], vocab)  # [N]
        count = torch.cat([seen[i].output_counts for i in counted]).to(logits.dtype)  # [N]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)  # [B]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)  # [B]
        logits = _penalize_counts(logits, flat, count, presence, frequency)
    return logits


class SeenTokens:
    """One request's tokens as the penalties need them, for a vocabulary V on one device.

    Invariant: output_ids and output_counts describe output_token_ids[:num_counted]; the output
    only ever grows (a preempted request keeps it), so `update` reads just the tokens appended
    since. Ids >= V are left out, as the penalties ignore them.
    """

    def __init__(self, prompt_token_ids: list[int], vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device
        prompt = torch.tensor(prompt_token_ids, dtype=torch.long)
        self.prompt_ids = prompt[prompt < vocab].unique().to(device)  # [P], distinct prompt ids
        self._ids = torch.empty(16, dtype=torch.long, device=device)  # [capacity]
        self._counts = torch.zeros(16, dtype=torch.long, device=device)  # [capacity]
        self._slot: dict[int, int] = {}  # output id -> its index in _ids / _counts
        self.num_counted = 0  # output tokens already counted

    @property
    def output_ids(self) -> Tensor:
        return self._ids[: len(self._slot)]  # [U], distinct output ids in order of first use

    @property
    def output_counts(self) -> Tensor:
        return self._counts[: len(self._slot)]  # [U], occurrences of each of output_ids

    def update(self, output_token_ids: list[int]) -> None:
        new = [t for t in output_token_ids[self.num_counted :] if t < self.vocab]
        self.num_counted = len(output_token_ids)
        if not new:
            return
        start = len(self._slot)
        slots = [self._slot.setdefault(t, len(self._slot)) for t in new]
        if len(self._slot) > len(self._ids):  # grow by doubling: O(1) amortized per token
            size = max(2 * len(self._ids), len(self._slot))
            more = size - len(self._ids)
            self._ids = torch.cat([self._ids, self._ids.new_empty(more)])
            self._counts = torch.cat([self._counts, self._counts.new_zeros(more)])
        if len(self._slot) > start:
            fresh = [t for t, s in zip(new, slots) if s >= start]  # first uses, in slot order
            self._ids[start : len(self._slot)] = torch.tensor(list(dict.fromkeys(fresh)))
        index = torch.tensor(slots, device=self.device)
        self._counts.index_put_((index,), torch.ones_like(index), accumulate=True)


class PenaltyCache:
    """The SeenTokens of each request, kept from one step to the next. Keyed weakly by the Request
    (a dataclass with eq=False, so it hashes by identity): an entry goes with its request."""

    def __init__(self) -> None:
        self._seen: weakref.WeakKeyDictionary[Request, SeenTokens] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, request: Request, vocab: int, device: torch.device) -> SeenTokens:
        """The request's SeenTokens, updated with the output tokens appended since the last call."""
        seen = self._seen.get(request)
        if (seen is None or seen.vocab != vocab or seen.device != device
                or len(request.output_token_ids) < seen.num_counted):  # rebuilt, not trusted
            seen = self._seen[request] = SeenTokens(request.prompt_token_ids, vocab, device)
        seen.update(request.output_token_ids)
        return seen


def _flat_index(ids: list[tuple[int, Tensor]], vocab: int) -> Tensor:
    """Row i's ids as positions in the flattened [B, V] logits, row * V + id: one [N] tensor."""
    return torch.cat([t + i * vocab for i, t in ids])


def _penalize_repetition(logits: Tensor, flat: Tensor, penalty: Tensor) -> Tensor:
    """The repetition penalty at the entries flat [N] (row * V + id) of logits [B, V], penalty [B].
    Returns a new tensor; only those entries are computed, and an entry listed twice gets the
    same value twice. 1-D index_select / index_copy_: several times faster than [rows, cols]."""
    out = logits.clone(memory_format=torch.contiguous_format)  # [B, V]
    seen = out.view(-1).index_select(0, flat)  # [N]
    p = penalty.index_select(0, flat // logits.shape[1])  # [N]
    # Capped at the largest float: a tiny penalty must not make an infinite (NaN-making) logit.
    penalized = torch.where(seen > 0, seen / p, seen * p).clamp_max_(torch.finfo(seen.dtype).max)
    return out.view(-1).index_copy_(0, flat, penalized).view_as(out)


def _penalize_counts(
    logits: Tensor, flat: Tensor, count: Tensor, presence: Tensor, frequency: Tensor
) -> Tensor:
    """OpenAI penalties at the distinct entries flat [N] (row * V + id) generated count [N] > 0
    times: logit -= presence + frequency * count, with presence and frequency [B]."""
    out = logits.clone(memory_format=torch.contiguous_format)  # [B, V]
    seen = out.view(-1).index_select(0, flat)  # [N]
    rows = flat // logits.shape[1]  # [N]
    frequency, presence = frequency.index_select(0, rows), presence.index_select(0, rows)  # [N]
    return out.view(-1).index_copy_(0, flat, seen - frequency * count - presence).view_as(out)

