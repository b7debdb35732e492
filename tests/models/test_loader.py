import json

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.models.gguf_loader import (hf_name, load_gguf_config_and_tokenizer,
                                          metadata_cache_key, unpermute_rope)
from tokenmill.models.hf_loader import iter_hf_weights
from tokenmill.models.loader import assign_weights, load_model, open_model
from tokenmill.models.registry import model_class

CPU = torch.device("cpu")


@pytest.mark.parametrize("sub", ["", "sharded"])
def test_hf_checkpoint_loads_every_weight_exactly(tiny_llama_dir, sub):
    from transformers import AutoModelForCausalLM

    path = tiny_llama_dir / sub
    if sub:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(str(path), torch.float32, CPU)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
    ours = dict(loaded.model.named_parameters())
    theirs = dict(ref.named_parameters())
    # q/k/v and gate/up are stacked in ours, in that order, each a MergedLinear.
    stacks = {"self_attn.qkv_proj.": ("self_attn.q_proj.", "self_attn.k_proj.",
                                      "self_attn.v_proj."),
              "mlp.gate_up_proj.": ("mlp.gate_proj.", "mlp.up_proj.")}
    used = set()
    for name, p in ours.items():
        parts = next(([name.replace(s, part) for part in parts]
                      for s, parts in stacks.items() if s in name), [name])
        used.update(parts)
        torch.testing.assert_close(p, torch.cat([theirs[n] for n in parts]), rtol=0, atol=0)
    assert used == set(theirs)
    assert loaded.config.eos_token_ids == (2, 7)
    assert loaded.config.num_key_value_heads == 2
    assert loaded.config.architecture == "LlamaForCausalLM"
    assert loaded.tokenizer.convert_tokens_to_ids("t5") == 5


def _tiny_weights(path):
    return dict(iter_hf_weights(path))


def test_a_stacked_projection_repeated_or_missing_is_a_clear_error(tiny_llama_dir):
    weights = _tiny_weights(tiny_llama_dir)
    k = "model.layers.0.self_attn.k_proj.weight"

    repeated = list(weights.items()) + [(k, weights[k])]
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj.weight' appears twice"):
        assign_weights(open_model(str(tiny_llama_dir)).model, repeated, torch.float32, CPU)

    missing = [(n, w) for n, w in weights.items() if n != k]
    with pytest.raises(KeyError, match=r"lacks weights: \['model.layers.0.self_attn.k_proj"):
        assign_weights(open_model(str(tiny_llama_dir)).model, missing, torch.float32, CPU)

    wrong = dict(weights, **{k: weights[k][:-1]})
    with pytest.raises(ValueError, match=r"k_proj.weight: checkpoint shape \(\d+, \d+\), model "
                                         r"expects"):
        assign_weights(open_model(str(tiny_llama_dir)).model, wrong.items(), torch.float32, CPU)


def test_dtype_is_applied_to_weights_not_rope(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), torch.bfloat16, CPU)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.rope.dtype == torch.float32


def test_missing_spec_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a .gguf"):
        load_model(str(tmp_path / "nope"), torch.float32, CPU)


def test_gguf_names_map_to_hf_names():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.1.ffn_gate_inp.weight") == "model.layers.1.block_sparse_moe.gate.weight"
    # Mixtral's experts: stacked [E, ...] (a template over the expert), or one per expert (old)
    assert hf_name("blk.2.ffn_up_exps.weight") == \
        "model.layers.2.block_sparse_moe.experts.{}.w3.weight"
    assert hf_name("blk.2.ffn_down.7.weight") == \
        "model.layers.2.block_sparse_moe.experts.7.w2.weight"
    assert hf_name("rope_freqs.weight") is None


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, D/2, ...).swapaxes(1, 2)
    n_head, d, h = 3, 8, 5
    w = torch.arange(n_head * d * h, dtype=torch.float32).reshape(n_head * d, h).numpy()
    permuted = w.reshape(n_head, 2, d // 2, h).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute_rope(permuted, n_head) == w).all()


def test_default_gguf_config_and_tokenizer(loaded_default_model):
    c = loaded_default_model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert loaded_default_model.model.lm_head is None
    tok = loaded_default_model.tokenizer
    assert tok.convert_ids_to_tokens(list(c.eos_token_ids)) == ["<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def _config(**kw) -> ModelConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8,
                intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                max_position_embeddings=4096, tie_word_embeddings=False, eos_token_ids=(2,))
    return ModelConfig(**base | kw)


def test_registry_supports_llama_and_mistral_with_any_window():
    from tokenmill.models.llama import LlamaForCausalLM
    from tokenmill.models.mistral import MistralForCausalLM

    assert model_class(_config()) is LlamaForCausalLM
    for window in (None, 4096, 1024):
        assert model_class(_config(architecture="MistralForCausalLM", sliding_window=window)) \
            is MistralForCausalLM


def test_registry_supports_qwen2_mixtral_and_rope_scaling():
    from tokenmill.models.llama import LlamaForCausalLM
    from tokenmill.models.mixtral import MixtralForCausalLM
    from tokenmill.models.qwen2 import Qwen2ForCausalLM

    assert model_class(_config(architecture="Qwen2ForCausalLM")) is Qwen2ForCausalLM
    assert model_class(_config(architecture="MixtralForCausalLM", num_local_experts=8,
                               num_experts_per_tok=2)) is MixtralForCausalLM
    for rope in ({"rope_type": "llama3", "factor": 8.0}, {"rope_type": "linear", "factor": 2.0},
                 {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "freq_factors"}):
        assert model_class(_config(rope_scaling=rope)) is LlamaForCausalLM


@pytest.mark.parametrize("kw, match", [
    (dict(sliding_window=1024), "sliding window"),  # Llama has no windowed attention
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "longrope"}), "rope_scaling type 'longrope'"),
    (dict(architecture="MixtralForCausalLM"), "num_local_experts=0"),
    (dict(num_local_experts=8, num_experts_per_tok=2), "routed experts"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(architecture="GPT2LMHeadModel"), "not supported"),
])
def test_registry_rejects_unsupported_features_clearly(kw, match):
    with pytest.raises(NotImplementedError, match=match):
        model_class(_config(**kw))


def test_engine_serves_a_sliding_window_mistral_within_its_window(tmp_path, tiny_llama_dir):
    """The window applies only to a context longer than it: max_model_len <= window is plain
    full attention."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, sliding_window=64, rms_norm_eps=1e-5,
                           bos_token_id=1, eos_token_id=2)
    torch.manual_seed(1)
    reference = MistralForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tmp_path)

    def engine(**options):
        return LLMEngine(EngineConfig(model=str(tmp_path), dtype="float32", device="cpu",
                                      kv_cache_gib=0.001, **options))

    assert engine().config.cache.sliding_window == 64
    served = engine(max_model_len=64)
    assert served.config.cache.sliding_window is None
    prompt = [5, 17, 42, 99, 8, 250, 3]
    served.add_request("m", prompt, SamplingParams(temperature=0.0, max_tokens=12,
                                                   ignore_eos=True))
    tokens = []
    while served.has_unfinished_requests():
        tokens += [t for out in served.step() for t in out.new_token_ids]
    with torch.inference_mode():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert tokens == expected.tolist()


def test_gguf_metadata_is_cached_and_the_cache_is_what_later_loads_read(default_model_path,
                                                                         tmp_path):
    config, tokenizer = load_gguf_config_and_tokenizer(default_model_path, tmp_path)
    (entry,) = tmp_path.iterdir()  # one complete entry, no partial left behind
    assert entry.name == metadata_cache_key(default_model_path)
    again_config, again = load_gguf_config_and_tokenizer(default_model_path, tmp_path)
    text = "Hello wörld, 你好 <|im_start|>user\n12345 🙂"
    assert again.encode(text) == tokenizer.encode(text)
    assert again.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert again.chat_template == tokenizer.chat_template
    assert (again.bos_token_id, again.eos_token_id) == (tokenizer.bos_token_id,
                                                        tokenizer.eos_token_id)
    assert again_config.to_diff_dict() == config.to_diff_dict()
    # Later loads read the entry, not the GGUF: an edit to it shows.
    saved = json.loads((entry / "tokenizer_config.json").read_text())
    (entry / "tokenizer_config.json").write_text(json.dumps({**saved, "model_max_length": 77}))
    assert load_gguf_config_and_tokenizer(default_model_path, tmp_path)[1].model_max_length == 77


def test_gguf_metadata_cache_key_follows_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF one")
    first = metadata_cache_key(path)
    assert metadata_cache_key(path) == first
    path.write_bytes(b"GGUF second")  # another size (and mtime)
    assert metadata_cache_key(path) != first
