"""The weight-only int8/int4 and bfloat16 linears, the row-count dispatch, and the linear plan:
what each kernel computes (exactly, against its dequantized weight over bfloat16 activations),
how a plan is chosen from timings, cached, and applied to a model."""

from __future__ import annotations

import weakref
from collections import Counter

import pytest
import torch
from torch import nn

from tokenmill.runner import linear_plan
from tokenmill.runner.cpu_linear import PackedLinear
from tokenmill.runner.linear_plan import (LinearPlan, apply_plan, auto_quantization, choose,
                                          kernel_for, kv_cache_dtype, linear_shapes,
                                          plan_for)
from tokenmill.runner.quant_linear import (INT4_GROUP, Bf16Linear, Int4Linear, Int8Linear,
                                           RowDispatch)


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the kernels compute: bfloat16-rounded activations times the (dequantized) weight,
    accumulated in float32."""
    return x.to(torch.bfloat16).float() @ weight.T


def test_int8_keeps_each_weight_within_half_a_step_and_matmuls_over_it():
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(5, 64)
    linear = Int8Linear.quantize(w)
    deq = linear.dequantized()
    step = linear.scales.float()[:, None]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    torch.testing.assert_close(linear(x), reference(x, deq), rtol=1e-2, atol=1e-2)


def test_a_q4_1_block_requantizes_to_exactly_its_own_weights_in_int4():
    """w = d * q + m per block of 32 with q spanning 0..15: int4's (q - 8) * s + z holds it with
    s = d and z = m + 8d, so the weights come back exactly (d and m exact in bfloat16)."""
    gen = torch.Generator().manual_seed(1)
    n, k = 16, 4 * INT4_GROUP
    q = torch.randint(0, 16, (n, k // INT4_GROUP, INT4_GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15  # every block spans the whole range
    d = torch.tensor([0.5, 0.25, 0.125, 1.0]).repeat(n, 1)[..., None]
    m = -torch.tensor([1.0, 2.0, 0.5, 4.0]).repeat(n, 1)[..., None]
    w = (d * q + m).view(n, k)
    linear = Int4Linear.quantize(w)
    assert torch.equal(linear.dequantized(), w)
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(linear(x), reference(x, w), rtol=1e-2, atol=1e-2)


def test_int4_error_stays_within_half_a_step_of_each_group():
    torch.manual_seed(2)
    w = torch.randn(32, 2 * INT4_GROUP)
    deq = Int4Linear.quantize(w).dequantized()
    groups = w.view(32, 2, INT4_GROUP)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (deq - w).view(32, 2, INT4_GROUP).abs().amax(-1)
    # Half a step, plus the bfloat16 rounding of the dequantized value the kernel returns.
    assert (err <= step / 2 + groups.abs().amax(-1) * 2 ** -8 + 1e-6).all()
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.quantize(torch.randn(8, 48))


def test_bf16_linear_rounds_activations_and_weights_once_and_returns_float32():
    torch.manual_seed(3)
    w, b, x = torch.randn(24, 16), torch.randn(24), torch.randn(4, 16)
    y = Bf16Linear(w, b)(x)
    assert y.dtype == torch.float32
    expected = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).float()
    assert torch.equal(y, expected)


class Recorder(nn.Module):
    def __init__(self, name: str, calls: list):
        super().__init__()
        self.name, self.calls = name, calls
        self.in_features, self.out_features = 4, 4

    def forward(self, x):
        self.calls.append((self.name, x.numel() // 4))
        return x


def test_row_dispatch_sends_up_to_threshold_rows_to_small_and_more_to_large():
    calls = []
    dispatch = RowDispatch(Recorder("small", calls), Recorder("large", calls), threshold=8)
    for rows in (1, 8, 9, 64):
        dispatch(torch.zeros(rows, 4))
    dispatch(torch.zeros(2, 4, 4))  # rows are every leading dimension together
    assert calls == [("small", 1), ("small", 8), ("large", 9), ("large", 64), ("small", 8)]


def test_a_plan_takes_the_fastest_kernel_at_each_end_and_switches_where_the_second_wins():
    ms = {"int4": {1: 6.0, 2: 7.0, 4: 9.0, 8: 15.0, 16: 28.0, 32: 53.0},
          "bf16": {1: 18.0, 2: 17.0, 4: 18.0, 8: 20.0, 16: 20.0, 32: 22.0}}
    plan = choose("int4", ms)
    assert (plan.small, plan.large, plan.threshold) == ("int4", "bf16", 8)
    assert plan.describe() == "int4: int4 up to 8 rows, bf16 above"
    one = choose("none", {"fp32-mkl": {1: 5.0, 8: 9.0}, "fp32-onednn": {1: 7.0, 8: 10.0}})
    assert (one.small, one.large) == ("fp32-mkl", "fp32-mkl")
    assert one.describe() == "none: fp32-mkl for every row count"


def test_a_plan_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    measured = []

    def fake_time(kernel, shapes, rows):
        measured.append(kernel)
        return {m: (m if kernel == "int8" else 4.0) for m in rows}

    monkeypatch.setattr(linear_plan, "_time_kernel", fake_time)
    shapes = Counter({(64, 32): 3})
    first = plan_for("int8", shapes, tmp_path)
    assert measured == ["int8", "bf16"]
    assert (first.small, first.large, first.threshold) == ("int8", "bf16", 4)
    assert plan_for("int8", shapes, tmp_path) == first and measured == ["int8", "bf16"]
    plan_for("int8", Counter({(64, 32): 4}), tmp_path)  # other shapes: measured anew
    assert measured == ["int8", "bf16"] * 2
    assert plan_for("bf16", shapes, tmp_path).small == "bf16"  # one kernel: nothing measured
    assert measured == ["int8", "bf16"] * 2
    with pytest.raises(ValueError, match="quantization must be one of"):
        plan_for("int3", shapes, tmp_path)


class Tiny(nn.Module):
    """A module tree shaped like our models: linears inside, a tied embedding as the head."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, 32)
        self.model.proj = nn.Linear(32, 64, bias=True)
        self.model.out = nn.Linear(64, 32, bias=False)
        self.lm_head = None


def test_applying_a_plan_replaces_every_linear_and_adds_the_tied_head():
    model = Tiny()
    assert linear_shapes(model) == Counter({(64, 32): 1, (32, 64): 1, (50, 32): 1})
    plan = LinearPlan("int8", "int8", "bf16", 4, {})
    weight, bias = model.model.proj.weight.detach().clone(), model.model.proj.bias
    assert apply_plan(model, plan) == 3
    for module in (model.model.proj, model.model.out, model.lm_head):
        assert isinstance(module, RowDispatch)
        assert isinstance(module.small, Int8Linear) and isinstance(module.large, Bf16Linear)
    x = torch.randn(2, 32)
    expected = reference(x, model.model.proj.small.dequantized()) + bias
    torch.testing.assert_close(model.model.proj(x), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(model.model.proj.large.weight, weight.bfloat16())
    int4 = Tiny()
    apply_plan(int4, LinearPlan("int4", "int4", "bf16", 8, {}))
    assert isinstance(int4.model.proj.small, Int4Linear)
    assert isinstance(int4.lm_head.small, Int8Linear)  # a head is never below int8
    single = Tiny()
    apply_plan(single, plan_for("none", linear_shapes(single), None))  # one kernel, no timing
    for module in (single.model.proj, single.model.out, single.lm_head):
        assert isinstance(module, PackedLinear)


def test_an_engine_asked_for_int4_runs_every_linear_through_its_plan(tiny_llama_dir, tmp_path,
                                                                     monkeypatch, caplog):
    from tokenmill import LLM, SamplingParams

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))  # the plan is measured and cached here
    # Timings as on a CPU where int4 wins up to 8 rows (tests never depend on real ones).
    monkeypatch.setattr(linear_plan, "_time_kernel", lambda kernel, shapes, rows: {
        m: (m if kernel == "int4" else 8.0) for m in rows})
    with caplog.at_level("INFO", logger="tokenmill.runner.model_runner"):
        llm = LLM(str(tiny_llama_dir), quantization="int4", kv_cache_gib=0.01, dtype="float32")
    model = llm.engine.runner.model
    kinds = {type(m).__name__ for m in model.modules() if isinstance(
        m, (nn.Linear, RowDispatch, Int4Linear, Bf16Linear))}
    assert "Linear" not in kinds and "Int4Linear" in kinds
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("linears: ")]
    assert line == "linears: int4: int4 up to 8 rows, bf16 above"
    assert len(list((tmp_path / "cache" / "linear-plans").glob("*.json"))) == 1
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=6, ignore_eos=True,
                                                   temperature=0.0))
    assert len(out[0].completions[0].token_ids) == 6


@pytest.mark.parametrize("bits, flags, expected", [
    (4.5, set(), "int4"),  # Q4_0
    (5.0, {"amx_bf16"}, "int4"),  # Q4_1
    (5.5, set(), "int8"),  # Q5_0: int4 would lose what the file kept
    (8.5, {"avx512_bf16"}, "int8"),  # Q8_0
    (16.0, {"amx_bf16", "avx2"}, "bf16"),
    (32.0, {"avx512_bf16"}, "bf16"),
    (16.0, {"avx2", "avx512f"}, "none"),  # bfloat16 only in software
])
def test_auto_keeps_a_gguf_narrow_and_floats_bf16_only_where_the_cpu_has_it(bits, flags, expected):
    mode, reason = auto_quantization(bits, flags)
    assert mode == expected
    assert f"{bits:g}" in reason


@pytest.mark.parametrize("flags, mode, kv", [
    ({"avx2"}, "none", torch.float32),
    ({"avx2", "amx_bf16"}, "bf16", torch.bfloat16),
])
def test_an_engine_asked_for_auto_logs_what_it_chose_and_why(tiny_llama_dir, tmp_path,
                                                             monkeypatch, caplog, flags, mode,
                                                             kv):
    from tokenmill import LLM

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    monkeypatch.setattr(linear_plan, "cpu_info", lambda: ("a CPU", flags))
    with caplog.at_level("INFO"):
        llm = LLM(str(tiny_llama_dir), quantization="auto", kv_cache_gib=0.01, dtype="float32")
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("quantization auto")]
    # The tiny checkpoint is float32 (its config's torch_dtype).
    why = ("32-bit float weights and no bfloat16 matmul units" if mode == "none" else
           "32-bit float weights on a CPU with amx_bf16")
    assert line == f"quantization auto -> {mode} ({why}); KV cache {str(kv)[6:]}"
    assert llm.engine.runner.kv_cache.dtype == kv


def test_a_bfloat16_kv_cache_holds_twice_the_blocks_of_a_float32_one(tiny_llama_dir, tmp_path,
                                                                      monkeypatch):
    """Only where the linears already take bfloat16 activations and the CPU has the units."""
    from tokenmill import LLM, SamplingParams

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    monkeypatch.setattr(linear_plan, "_time_kernel", lambda kernel, shapes, rows: {
        m: (m if kernel == "int4" else 8.0) for m in rows})
    blocks = {}
    for flags in ({"avx2"}, {"avx512_bf16"}):
        monkeypatch.setattr(linear_plan, "cpu_info", lambda flags=flags: ("a CPU", flags))
        llm = LLM(str(tiny_llama_dir), quantization="int4", kv_cache_gib=0.01, dtype="float32")
        runner = llm.engine.runner
        blocks[runner.kv_cache.dtype] = runner.kv_cache.shape[2]
        out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=6, ignore_eos=True,
                                                       temperature=0.0))
        assert len(out[0].completions[0].token_ids) == 6
    assert blocks[torch.bfloat16] // 2 == blocks[torch.float32]  # the same bytes, floored
    assert kv_cache_dtype("none", torch.float32, {"amx_bf16"}) == torch.float32
    assert kv_cache_dtype("int8", torch.bfloat16, set()) == torch.bfloat16  # the model's own


def test_the_default_gguf_is_int4_under_auto(default_model_path):
    from tokenmill.models.gguf_loader import gguf_weight_bits

    assert gguf_weight_bits(default_model_path) == 5.0  # Q4_1: 20 bytes per 32 weights
    assert auto_quantization(5.0)[0] == "int4"


def test_quantization_is_refused_for_a_model_not_run_in_float32_on_the_cpu(tiny_llama_dir):
    from tokenmill import LLM

    with pytest.raises(ValueError, match="quantization 'int8' is for float32 models on the CPU"):
        LLM(str(tiny_llama_dir), quantization="int8", kv_cache_gib=0.01, dtype="bfloat16")


def test_a_weight_a_kernel_cannot_take_goes_to_the_next_wider_one():
    assert kernel_for("int4", (64, 64)) == "int4"
    assert kernel_for("int4", (64, 64), head=True) == "int8"
    assert kernel_for("int4", (24, 64)) == "int8"  # N not in 16s
    assert kernel_for("int4", (64, 48)) == "int8"  # K not in groups of 32
    assert kernel_for("int4", (64, 40)) == "bf16"  # nor in 16s: int8's kernel miscomputes it
    assert kernel_for("int8", (64, 40)) == "bf16"
    assert kernel_for("int8", (33, 48)) == "int8"
    torch.manual_seed(4)
    w, x = torch.randn(33, 40), torch.randn(3, 40)
    module = LinearPlan("int8", "int8", "int8", 128, {}).build(w)
    assert isinstance(module, Bf16Linear)
    torch.testing.assert_close(module(x), x @ w.T, rtol=2e-2, atol=5e-2)


def test_an_unreadable_cached_plan_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(linear_plan, "_time_kernel", lambda kernel, shapes, rows: {
        m: (m if kernel == "int8" else 4.0) for m in rows})
    shapes = Counter({(64, 32): 3})
    plan = plan_for("int8", shapes, tmp_path)
    [cached] = tmp_path.glob("*.json")
    cached.write_text('{"quantization": "int8", "sma')  # cut off by a full disk
    assert plan_for("int8", shapes, tmp_path) == plan
    assert plan_for("int8", shapes, tmp_path) == plan  # rewritten whole
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no partial file left


def test_the_none_plan_packs_every_linear_once():
    inner = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), inner)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        expected = model(x)
        plan = plan_for("none", linear_shapes(model), None)
        assert apply_plan(model, plan) == 3
        assert apply_plan(model, plan) == 0  # idempotent: engines sharing a model may each pack it
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_applying_a_plan_frees_each_plain_weight_before_building_the_next(monkeypatch):
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    plain = [weakref.ref(m.weight) for m in model]
    alive_when_packing = []

    class CountingPackedLinear(PackedLinear):
        def __init__(self, weight, bias=None):
            alive_when_packing.append(sum(ref() is not None for ref in plain))
            super().__init__(weight, bias)

    monkeypatch.setitem(linear_plan.BUILDERS, "fp32-onednn", CountingPackedLinear)
    assert apply_plan(model, plan_for("none", linear_shapes(model), None)) == 4
    assert alive_when_packing == [4, 3, 2, 1]  # never more than one plain weight beyond the rest
    assert all(ref() is None for ref in plain)
