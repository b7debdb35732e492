"""Grammar masks: the allowed next tokens of each constrained row, computed beside the forward.

`GrammarMasks.start` hands the step's constrained matchers to one worker thread, which fills a
packed bitmask [S, W] (bit t % 32 of word t // 32 set: token t allowed; W = ceil(V / 32)) row by
row; llguidance drops the GIL while it works, so the model's forward runs on the step thread
meanwhile and the masks cost only their wait (0.02 ms a step, benchmarks/bench_structured.py).
The worker runs no torch op (it writes through a raw pointer), so it never starts a second
OpenMP team (see engine/async_llm.py on why that matters). It is one plain thread, not
llguidance's parallel `LLExecutor`: that executor's worker threads spin after their work, in
the cores the forward's OpenMP threads need, which made a 16-row decode step 20-24% slower with
4 or 16 constrained rows; one thread made it no slower. `apply_bitmask` is the sampler's first
stage.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from tokenmill.engine.request import Request


class GrammarMasks:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._pool: ThreadPoolExecutor | None = None  # started with the first constrained step

    def start(self, requests: list[Request]) -> Future[Tensor] | None:
        """Begin computing the masks of the sampling `requests` (in batch order); None when no
        row is constrained. The future's result is an int32 bitmask [S, W]; rows without a
        grammar are all ones."""
        rows = [(r.grammar.matcher, i) for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-grammar")
        bitmask = torch.full((len(requests), (self.vocab_size + 31) // 32), -1, dtype=torch.int32)
        return self._pool.submit(self._fill, rows, bitmask)

    @staticmethod
    def _fill(rows: list, bitmask: Tensor) -> Tensor:
        """On the grammar thread: each (matcher, row) writes its mask into bitmask[row]."""
        row_bytes = bitmask.shape[1] * bitmask.element_size()
        for matcher, row in rows:
            matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
        return bitmask


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """The packed int32 bitmask [R, W] as booleans [R, vocab_size]: True where allowed. numpy's
    unpackbits is ~6x faster here than shifts in torch; the int32 words are read as their bytes,
    low byte first (every platform torch runs on is little-endian, and so is llguidance's layout).
    """
    words = bitmask.cpu().numpy()
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [R, 32 W]
    return torch.from_numpy(bits[:, :vocab_size]).view(torch.bool)


def apply_bitmask(logits: Tensor, bitmask: Tensor, rows: list[int]) -> Tensor:
    """logits [B, V] with the disallowed tokens of `rows` (whose masks are bitmask[rows]) set to
    -inf; a new tensor, the input is not modified. Other rows are untouched."""
    vocab = logits.shape[1]
    if len(rows) == logits.shape[0]:  # every row constrained: no gather, no scatter
        allowed = unpack_bitmask(bitmask, vocab).to(logits.device)  # [B, V]
        return torch.where(allowed, logits, float("-inf"))
    index = torch.tensor(rows, device=logits.device)  # [R]
    allowed = unpack_bitmask(bitmask[rows], vocab).to(logits.device)  # [R, V]
    return logits.index_copy(0, index, torch.where(allowed, logits[index], float("-inf")))
