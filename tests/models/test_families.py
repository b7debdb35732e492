"""Every served family against transformers, float32: our logits over the paged cache (whole
prompt, chunked prefill then decodes, a mixed flat batch) within 1e-4, and greedy continuations
through the real engine (chunked prefill, continuous batching, prefix cache) token for token.

The tiny random checkpoints come from tests/tiny_models.py; Mistral's sliding window has its own
tests, here Mistral runs without a window. RoPE scaling is checked on its cos/sin table too."""

import pytest
import torch
from test_llama import BLOCK, new_cache, run  # tests/models is on sys.path (pytest rootdir)
from tiny_models import tiny_config

from tokenmill.config import ModelConfig
from tokenmill.llm import LLM
from tokenmill.models.loader import load_model
from tokenmill.models.mixtral import MixtralSparseMoeBlock
from tokenmill.models.rope import rope_cache
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
# Prefill chunks run on PyTorch's CPU flash kernel, whose online softmax sums the keys in blocks,
# in another order than transformers' attention: on the tiny Llama 3 and Mixtral (activations
# ~1e3 from initializer_range 1.0) whole-prompt logits come up to 1.2e-4 apart (others: 1e-4).
TOL = dict(rtol=1e-4, atol=2e-4)
# In a mixed batch each expert's matmul also holds other requests' tokens, a different BLAS
# blocking than alone: on the tiny Mixtral (activations ~1e3 from initializer_range 1.0) a token's
# logits move by up to 2.2e-4 with its batch neighbours (dense families: 3e-5).
MOE_BATCH_TOL = dict(rtol=1e-4, atol=5e-4)
# On AVX-512 (AMD EPYC here) oneDNN's kernels sum in another order than on AVX2 (where the dense
# families keep 1e-4): in a mixed flat batch the tiny Llama 3's logits moved by up to 9.6e-4
# from transformers', its float32 rounding against float64 being ~5e-4 already.
DENSE_BATCH_TOL = dict(rtol=1e-4, atol=2e-3)
# Each family's tiny checkpoint; "mistral_full" is the tiny Mistral with no sliding window.
FAMILIES = ("llama", "llama3", "mistral_full", "qwen2", "qwen2_tied", "mixtral")
TEXTS = (  # ~80 tokens, so prompt and continuation run past llama3's original context of 64
    "The mill stood by the river for three hundred years. Every morning the miller opened the "
    "sluice, the wheel began to turn, and the stones ground wheat from farms as far as the hills. "
    "Travellers who stopped there remembered the sound of the water, the smell of flour and the "
    "miller's dog asleep by the door, long after they had forgotten the name of the village and",
    "def tokenize(text):\n    return [t for t in text.split() if t]\n",
    "Paris, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, Warsaw, Dublin, Oslo,",
)


def save_variant(path, tokenizer, family, **overrides):
    """tiny_config(family) with `overrides`, random weights drawn as tests/tiny_models does."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, tokenizer)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, real_tokenizer, tmp_path_factory):
    def get(family):
        if family == "mistral_full":
            return save_variant(tmp_path_factory.mktemp("mistral_full"), real_tokenizer,
                                "mistral", sliding_window=None)
        return tiny_checkpoint(family)
    return get


def reference(path):
    """transformers' model, float32, with eager attention: its default (sdpa) differs from its own
    eager attention by up to 1.5e-4 on these checkpoints, a summation-order difference that the
    1e-4 bound would otherwise measure."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def models(checkpoint):
    """family -> (our LoadedModel, transformers' model), float32, built once per family."""
    made = {}

    def get(family):
        if family not in made:
            path = checkpoint(family)
            made[family] = (load_model(str(path), torch.float32, CPU), reference(path))
        return made[family]
    return get


def hf_logits(ref, ids, chunks=None):
    """transformers' logits [T, V] of `ids`, computed chunk by chunk over its own KV cache when
    `chunks` (ends of chunks) are given, as our steps compute them: on these checkpoints its
    decode rows differ from its whole-sequence rows by up to 2.4e-4 (float32 summation order)."""
    from transformers import DynamicCache

    cache, start, rows = DynamicCache(config=ref.config), 0, []
    with torch.inference_mode():
        for end in chunks or [len(ids)]:
            out = ref(torch.tensor([ids[start:end]]), cache=cache, use_cache=True)
            rows.append(out.logits[0].float())
            start = end
    return torch.cat(rows)


@pytest.fixture(scope="module")
def prompts(real_tokenizer):
    return [real_tokenizer.encode(t) for t in TEXTS]


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_prompt_logits_equal_transformers(models, prompts, family):
    ours, ref = models(family)
    ids = prompts[0]
    table = list(range(40, 0, -1))  # blocks in reverse order
    logits = run(ours.model, new_cache(ours.config, 48), [(ids, 0, table)])
    assert len(ids) > 64 and logits.shape == (len(ids), ours.config.vocab_size)
    torch.testing.assert_close(logits, hf_logits(ref, ids), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_then_decodes_equal_transformers(models, prompts, family):
    ours, ref = models(family)
    full = prompts[0]
    ends = [13, 50, len(full) - 6] + list(range(len(full) - 5, len(full) + 1))  # then decodes
    cache = new_cache(ours.config, 48)
    table = [(7 * i + 3) % 47 for i in range(len(full) // BLOCK + 1)]  # scattered blocks
    got = [run(ours.model, cache, [(full[a:b], a, table[:(b - 1) // BLOCK + 1])])
           for a, b in zip([0] + ends, ends)]
    torch.testing.assert_close(torch.cat(got), hf_logits(ref, full, ends), **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_flat_batch_equals_transformers(models, prompts, family):
    ours, ref = models(family)
    a, b, c = prompts
    cache = new_cache(ours.config, 64)
    ta, tb, tc = list(range(0, 24)), list(range(24, 32)), list(range(32, 48))
    run(ours.model, cache, [(a[:-1], 0, ta), (b[:-1], 0, tb)])  # earlier steps
    # One step: two decodes (a, b), c's whole prompt, then a chunk of a copy of b from 9 on.
    logits = run(ours.model, cache, [(a[-1:], len(a) - 1, ta), (b[-1:], len(b) - 1, tb),
                                     (c, 0, tc), (b[9:], 9, tb)])
    tol = MOE_BATCH_TOL if family == "mixtral" else DENSE_BATCH_TOL
    torch.testing.assert_close(logits[0], hf_logits(ref, a, [len(a) - 1, len(a)])[-1], **tol)
    torch.testing.assert_close(logits[1], hf_logits(ref, b, [len(b) - 1, len(b)])[-1], **tol)
    torch.testing.assert_close(logits[2:2 + len(c)], hf_logits(ref, c), **tol)
    torch.testing.assert_close(logits[2 + len(c):], hf_logits(ref, b, [9, len(b)])[9:], **tol)


def hf_greedy(ref, ids, n):
    with torch.inference_mode():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_equals_transformers_alone_batched_and_prefix_cached(
        checkpoint, models, prompts, family):
    _, ref = models(family)
    n = 16
    expected = [hf_greedy(ref, ids, n) for ids in prompts]
    llm = LLM(str(checkpoint(family)), dtype="float32", device="cpu", kv_cache_gib=0.01,
              max_num_batched_tokens=16, block_size=16, enable_prefix_caching=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def generate(batch):
        return llm.generate([prompts[i] for i in batch], greedy)

    (alone,) = generate([0])  # 16-token chunks of an 80-token prompt
    assert alone.completions[0].token_ids == expected[0]
    mixed = generate([1, 0, 2])  # prefills chunked among the others' decodes
    assert [r.completions[0].token_ids for r in mixed] == [expected[i] for i in (1, 0, 2)]
    (again,) = generate([0])
    assert again.num_cached_tokens == len(prompts[0]) // 16 * 16
    assert again.completions[0].token_ids == expected[0]


# RoPE scaling: the cos/sin table against transformers' rotary embedding.

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("rope, max_positions, served", [
    ({"rope_type": "default", "rope_theta": 10000.0}, 512, 512),
    (LLAMA3, 512, 512),
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 128, 512),
    # dynamic NTK: HF recomputes per sequence; it agrees with our table at the longest length
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, 128, 512),
])
def test_rope_table_equals_transformers(real_tokenizer, rope, max_positions, served):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = tiny_config("llama", real_tokenizer)
    hf.rope_parameters, hf.max_position_embeddings = rope, max_positions
    config = ModelConfig.from_hf(hf)
    assert config.max_position_embeddings == served
    ours = rope_cache(config.head_dim, served, config.rope_theta, config.rope_scaling)
    positions = torch.arange(served)[None]  # one sequence of the longest served length
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(ours[:, 0], cos[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[:, 1], sin[0], rtol=1e-6, atol=1e-6)


def test_llama3_scaling_changes_the_table_from_default(real_tokenizer):
    """Guards the test above against a rope_type that is silently ignored."""
    hf = tiny_config("llama3", real_tokenizer)
    scaled = ModelConfig.from_hf(hf)
    plain = rope_cache(scaled.head_dim, 512, scaled.rope_theta)
    assert (rope_cache(scaled.head_dim, 512, scaled.rope_theta, scaled.rope_scaling)
            - plain).abs().max() > 0.5


@pytest.mark.parametrize("rope, max_positions, length", [
    ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 64, 100),
    ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 48, 96),  # = 48 x 2
])
def test_scaled_rope_logits_equal_transformers(real_tokenizer, tmp_path, prompts, rope,
                                               max_positions, length):
    path = save_variant(tmp_path, real_tokenizer, "llama", rope_parameters=rope,
                        max_position_embeddings=max_positions)
    ours, ref = load_model(str(path), torch.float32, CPU), reference(path)
    ids = (prompts[0] * 2)[:length]
    logits = run(ours.model, new_cache(ours.config, 32), [(ids, 0, list(range(length // 4 + 1)))])
    torch.testing.assert_close(logits, hf_logits(ref, ids), **TOL)


# ModelConfig.from_hf: what the families' configs carry.

def test_qwen2_window_follows_use_sliding_window_and_layer_types(real_tokenizer):
    from transformers import Qwen2Config

    assert ModelConfig.from_hf(tiny_config("qwen2", real_tokenizer)).sliding_window is None
    off = Qwen2Config(use_sliding_window=False, sliding_window=4096)  # as released configs say
    off.sliding_window = 4096  # a config built elsewhere may keep the number
    assert ModelConfig.from_hf(off).sliding_window is None
    every_layer = Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2,
                              max_window_layers=0)
    assert ModelConfig.from_hf(every_layer).sliding_window == 64
    no_layer = Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2,
                           max_window_layers=2)
    assert ModelConfig.from_hf(no_layer).sliding_window is None
    some = Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2,
                       max_window_layers=1)
    with pytest.raises(NotImplementedError, match="some layers only"):
        ModelConfig.from_hf(some)


def test_mixtral_config_reads_experts(real_tokenizer):
    c = ModelConfig.from_hf(tiny_config("mixtral", real_tokenizer))
    assert (c.architecture, c.num_local_experts, c.num_experts_per_tok) == (
        "MixtralForCausalLM", 4, 2)


# Mixtral's grouped experts against the per-token definition.

@pytest.mark.parametrize("num_tokens", [1, 3, 37])
def test_grouped_moe_equals_per_token_loop(num_tokens):
    config = ModelConfig(architecture="MixtralForCausalLM", vocab_size=8, hidden_size=16,
                         intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         eos_token_ids=(0,), num_local_experts=5, num_experts_per_tok=2)
    torch.manual_seed(num_tokens)
    moe = MixtralSparseMoeBlock(config).requires_grad_(False)
    x = torch.randn(num_tokens, 16)
    expected = []
    for token in x:  # Mixtral's definition, one token at a time
        top, experts = torch.softmax(moe.gate(token), dim=-1).topk(2)
        expected.append(sum(w / top.sum() * moe.experts[int(e)](token[None])[0]
                            for w, e in zip(top, experts)))
    torch.testing.assert_close(moe(x), torch.stack(expected), rtol=1e-5, atol=1e-6)
    if num_tokens == 37:  # every expert got tokens, so every group ran
        assert torch.bincount(moe.route(x)[1].flatten(), minlength=5).min() > 0
