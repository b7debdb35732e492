"""oneDNN-prepacked linears: same results as nn.Linear, padded row counts, and the runner's
packed copy of a model (swapping them in: tests/runner/test_quant_linear.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenmill.runner.cpu_linear import PackedLinear, can_pack, padded_rows

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="this torch build has no oneDNN (mkldnn) CPU backend")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 17, 333])  # 17 and 333 run padded, to 18 and 352
def test_packed_linear_equals_nn_linear(bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear.weight, linear.bias)(x), linear(x),
                                   rtol=1e-5, atol=1e-5)


def test_padded_rows_are_56_sizes_up_to_512_at_most_an_eighth_above():
    sizes = {m: padded_rows(m) for m in range(1, 513)}
    assert all(m <= p <= m + m // 8 for m, p in sizes.items())
    assert [sizes[m] for m in (1, 15, 16, 17, 31, 32, 33, 100, 257, 512)] == \
        [1, 15, 16, 18, 32, 32, 36, 104, 288, 512]
    assert len(set(sizes.values())) == 56


def test_packed_linear_keeps_leading_dims():
    linear = nn.Linear(8, 4, bias=False)
    with torch.inference_mode():
        assert PackedLinear(linear.weight)(torch.randn(2, 3, 8)).shape == (2, 3, 4)


def test_runner_packs_a_copy_and_the_tied_lm_head(loaded_default_model):
    from tokenmill.config import CacheConfig
    from tokenmill.runner.model_runner import ModelRunner

    runner = ModelRunner(loaded_default_model, CacheConfig(num_blocks=4), torch.device("cpu"),
                         torch.float32)
    model = runner.model
    assert isinstance(model.lm_head, PackedLinear)
    assert loaded_default_model.model.lm_head is None  # the loaded model is never mutated
    assert isinstance(loaded_default_model.model.model.layers[0].mlp.gate_up_proj, nn.Linear)
    assert model.model.embed_tokens.weight is loaded_default_model.model.model.embed_tokens.weight
    hidden = torch.randn(3, model.config.hidden_size)
    with torch.inference_mode():
        reference = hidden @ model.model.embed_tokens.weight.T  # [3, V]
        torch.testing.assert_close(model.compute_logits(hidden), reference, rtol=1e-4, atol=1e-4)
