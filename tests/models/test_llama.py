"""Our Llama forward over the paged cache against transformers' logits."""

import pytest
import torch

from tokenmill.models.loader import load_model
from tokenmill.runner.attention import TorchAttentionMetadata

CPU = torch.device("cpu")
BLOCK = 4


def new_cache(config, num_blocks=32):
    shape = (num_blocks, BLOCK, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]


@torch.inference_mode()
def run(model, cache, rows):
    """rows: (token_ids, first position, block table); decodes (one token) first.
    Returns logits [T, V] of every token of the flat batch."""
    ids = [t for toks, _, _ in rows for t in toks]
    pos = [p for toks, start, _ in rows for p in range(start, start + len(toks))]
    attn = TorchAttentionMetadata.build([len(t) for t, _, _ in rows],
                                        [s + len(t) for t, s, _ in rows],
                                        [bt for _, _, bt in rows], BLOCK, CPU)
    hidden = model(torch.tensor(ids), torch.tensor(pos), attn, cache)
    return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    ours = load_model(str(tiny_llama_dir), torch.float32, CPU)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    return ours, ref


def hf_logits(ref, ids):
    with torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0].float()  # [T, V]


PROMPT = [1, 17, 250, 3, 99, 42, 42, 7, 128, 201, 5, 66, 13]


def test_whole_prompt_logits_equal_transformers(tiny):
    ours, ref = tiny
    logits = run(ours.model, new_cache(ours.config), [(PROMPT, 0, [3, 9, 0, 5])])
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), 300)
    torch.testing.assert_close(logits, hf_logits(ref, PROMPT), rtol=1e-5, atol=1e-5)


def test_chunked_prefill_then_decodes_equal_full_sequence(tiny):
    ours, ref = tiny
    full = PROMPT + [11, 12, 13, 14, 15, 16]
    expected = hf_logits(ref, full)
    cache = new_cache(ours.config)
    table = [17, 2, 30, 8, 21]  # non-contiguous, out of order
    got = [run(ours.model, cache, [(full[0:5], 0, table[:2])]),
           run(ours.model, cache, [(full[5:13], 5, table[:4])])]
    for p in range(13, len(full)):  # one token at a time
        got.append(run(ours.model, cache, [(full[p:p + 1], p, table[:p // BLOCK + 1])]))
    torch.testing.assert_close(torch.cat(got), expected, rtol=1e-5, atol=1e-5)


def test_mixed_flat_batch_equals_each_request_alone(tiny):
    ours, ref = tiny
    a, b, c = PROMPT, [1, 5, 6, 7, 8, 9, 10], [1, 200, 100, 50, 25, 12, 6, 3, 299]
    cache = new_cache(ours.config)
    # Earlier steps: a and b have their first tokens cached; c is new.
    run(ours.model, cache, [(a[:12], 0, [4, 11, 6]), (b[:6], 0, [20, 1])])
    # One step: two decodes (a, b), then c's whole prompt, then a second chunk of a copy of b.
    logits = run(ours.model, cache, [(a[12:], 12, [4, 11, 6, 13]), (b[6:], 6, [20, 1]),
                                     (c, 0, [9, 3, 25]), (b[2:], 2, [20, 1])])
    torch.testing.assert_close(logits[0], hf_logits(ref, a)[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], hf_logits(ref, b)[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[2:11], hf_logits(ref, c), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[11:], hf_logits(ref, b)[2:], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def hf_default(default_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path.parent,
                                                gguf_file=default_model_path.name,
                                                torch_dtype=torch.float32).eval()


@pytest.mark.slow
def test_default_model_logits_and_greedy_equal_transformers(loaded_default_model, hf_default):
    m, tok = loaded_default_model, loaded_default_model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    prompt_logits, ours = greedy_through_cache(m, ids, 20)
    torch.testing.assert_close(prompt_logits, hf_logits(hf_default, ids), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        ref = hf_default.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == ref


def greedy_through_cache(loaded, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    """The prompt's logits [T, V] and `n` greedy tokens, one decode step at a time over a paged
    cache whose blocks are numbered in reverse."""
    cache = new_cache(loaded.config, num_blocks=64)
    table = list(range(63, 0, -1))
    logits = prompt_logits = run(loaded.model, cache, [(ids, 0, table)])
    ours, seq = [], list(ids)
    for _ in range(n):
        ours.append(int(logits[-1].argmax()))
        seq.append(ours[-1])
        logits = run(loaded.model, cache, [(seq[-1:], len(seq) - 1, table)])
    return prompt_logits, ours
