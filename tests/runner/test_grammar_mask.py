"""Grammar masks: the packed bitmask's layout, its application to logits, and GrammarMasks
filling the rows of constrained requests (the real tokenizer and llguidance) on its thread."""

from __future__ import annotations

import torch

from tokenmill.engine.request import Request
from tokenmill.engine.structured import GrammarCompiler
from tokenmill.runner.grammar_mask import GrammarMasks, apply_bitmask, unpack_bitmask
from tokenmill.sampling_params import SamplingParams, StructuredOutputs


def naive_unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bit t % 32 of word t // 32, read one token at a time."""
    words = bitmask.tolist()
    return torch.tensor([[(row[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab)]
                         for row in words])


def test_unpack_reads_bit_t_of_word_t_over_32_including_the_sign_bit():
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 4), dtype=torch.int32, generator=g)
    bitmask[0, 0] = -2**31  # only bit 31: token 31
    assert torch.equal(unpack_bitmask(bitmask, 125), naive_unpack(bitmask, 125))
    assert unpack_bitmask(bitmask, 125)[0, :32].nonzero().flatten().tolist() == [31]


def test_apply_masks_only_the_constrained_rows():
    logits = torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40)
    bitmask = torch.zeros(3, 2, dtype=torch.int32)
    bitmask[0, 0] = 0b1010  # row 0 allows tokens 1 and 3
    bitmask[2, 1] = 1  # row 2 allows token 32
    out = apply_bitmask(logits, bitmask, [0, 2])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(out[1], logits[1])  # unconstrained: untouched
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [32]
    assert out[0, 3] == logits[0, 3]
    assert torch.equal(logits[0], torch.arange(40, dtype=torch.float32))  # input not modified
    every = apply_bitmask(logits, bitmask, [0, 1, 2])  # the all-rows path agrees
    assert torch.equal(every[[0, 2]], out[[0, 2]])
    assert torch.isneginf(every[1]).all()


def test_grammar_masks_fill_the_constrained_rows_on_their_thread(real_tokenizer):
    vocab = 49152
    compiler = GrammarCompiler(real_tokenizer, vocab, (2,))
    spec = StructuredOutputs.choice(["yes", "no"])
    free = Request("free", [1, 2], SamplingParams())
    bound = Request("bound", [1, 2], SamplingParams(structured=spec),
                    grammar=compiler.grammar(spec))
    masks = GrammarMasks(vocab)
    assert masks.start([free]) is None
    bitmask = masks.start([free, bound]).result()
    allowed = unpack_bitmask(bitmask, vocab)
    assert allowed[0].all()  # no grammar: all ones
    first = {real_tokenizer.decode([t]) for t in allowed[1].nonzero().flatten().tolist()}
    assert first and all("yes".startswith(t) or "no".startswith(t) for t in first)
