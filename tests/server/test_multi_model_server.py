"""One real `tokenmill serve` with the tiny checkpoint of every family, each a catalog entry with
its own price: greedy completions over HTTP equal transformers', requests are routed and billed by
model id, and an id that is not served is a 404 naming the served ones."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from server_live import start_server, stop_server

# tests/tiny_models family -> the catalog's family of that architecture
FAMILY_OF = {"llama": "llama", "llama3": "llama", "mistral": "mistral", "qwen2": "qwen2",
             "qwen2_tied": "qwen2", "mixtral": "mixtral"}
FAMILIES = tuple(FAMILY_OF)
# micro-USD per 1M tokens, distinct per model: (input, cached input, output)
PRICES = {family: (10_000 * (i + 1), 1_000 * (i + 1), 30_000 * (i + 1))
          for i, family in enumerate(FAMILIES)}
NEW_TOKENS = 24
# Prompts longer than the tiny Mistral's window of 16 and than llama3's original 64 positions
# once generation is done.
TEXTS = ("The mill stood by the river for three hundred years, and every morning the miller "
         "opened the sluice so that the wheel began to turn and the stones ground the wheat.",
         "Paris, Berlin, Madrid, Rome, Lisbon, Vienna, Prague, Warsaw, Dublin, Oslo, Bern,")


def model_id(family: str) -> str:
    return f"tiny/{family}"


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory, tiny_checkpoint):
    """A catalog whose entries point at the tiny checkpoints: served by directory (`--model DIR`),
    each is known by its entry's id and priced at its entry's price."""
    entries = [{"id": model_id(f), "name": f"Tiny {f}", "summary": "s", "card": "c",
                "family": FAMILY_OF[f],
                "template": "chatml", "context_length": 512,
                "price": {"input": f"{PRICES[f][0] / 1e6:.6f}",
                          "cached_input": f"{PRICES[f][1] / 1e6:.6f}",
                          "output": f"{PRICES[f][2] / 1e6:.6f}"},
                "source": {"path": str(tiny_checkpoint(f))}, "hardware": "any"}
               for f in FAMILIES]
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(json.dumps({"models": entries}))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def multi_server(tmp_path_factory, catalog_file, tiny_checkpoint):
    home = tmp_path_factory.mktemp("tokenmill_home_multi")
    args = ["--catalog", str(catalog_file), "--dtype", "float32", "--no-auth",
            "--kv-cache-gib", "0.3", "--max-model-len", "256", "--drain-timeout", "5",
            "--max-num-batched-tokens", "16"]  # prompts of ~30 tokens prefill in chunks
    for family in FAMILIES:
        args += ["--model", str(tiny_checkpoint(family))]
    running = start_server(home, args)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def expected(tiny_checkpoint, real_tokenizer):
    """family -> per prompt, transformers' greedy continuation (token ids), EOS ignored."""
    from transformers import AutoModelForCausalLM

    result = {}
    for family in FAMILIES:
        ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(family), dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        result[family] = []
        for text in TEXTS:
            ids = real_tokenizer.encode(text)
            with torch.inference_mode():
                out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
            result[family].append((ids, out[0, len(ids):].tolist()))
    return result


def test_every_family_answers_by_id_with_transformers_greedy_tokens_at_its_own_price(
        multi_server, expected, real_tokenizer):
    """Every family at once, two prompts each, prefilled in chunks among the others' decodes;
    then again, when the prompts' full blocks come from the prefix cache."""
    async def one(client, family, prompt_no):
        ids, _ = expected[family][prompt_no]
        body = {"model": model_id(family), "prompt": ids, "max_tokens": NEW_TOKENS,
                "temperature": 0, "ignore_eos": True, "logprobs": 0}
        r = await client.post("/completions", json=body)
        assert r.status_code == 200, r.text
        return family, prompt_no, r.json()

    async def all_at_once():  # every engine busy at once, two prompts each
        async with httpx.AsyncClient(base_url=multi_server.v1, timeout=120) as client:
            return await asyncio.gather(*(one(client, f, p) for f in FAMILIES
                                          for p in range(len(TEXTS))))

    first, again = asyncio.run(all_at_once()), asyncio.run(all_at_once())
    for (family, prompt_no, body), (_, _, repeat) in zip(first, again):
        ids, want = expected[family][prompt_no]
        tokens = body["choices"][0]["logprobs"]["tokens"]
        assert repeat["choices"][0]["logprobs"]["tokens"] == tokens
        cached = repeat["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (len(ids) - 1) // 16 * 16 > 0  # whole blocks, the last token recomputed
        price_in, price_cached, price_out = PRICES[family]
        assert repeat["usage"]["estimated_cost"] == (
            (len(ids) - cached) * price_in + cached * price_cached + NEW_TOKENS * price_out) / 1e12
        assert body["model"] == model_id(family)
        choice = body["choices"][0]
        # logprobs carries each generated token's text: the tokens transformers chose
        assert choice["logprobs"]["tokens"] == [
            real_tokenizer.decode([t], skip_special_tokens=False) for t in want], family
        assert choice["finish_reason"] == "length"
        usage = body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), NEW_TOKENS)
        assert usage["estimated_cost"] == (len(ids) * price_in + NEW_TOKENS * price_out) / 1e12


def test_models_lists_every_served_model_with_its_price(multi_server):
    data = httpx.get(multi_server.v1 + "/models").json()["data"]
    assert [(m["id"], m["pricing"]) for m in data] == [
        (model_id(f), {"input": PRICES[f][0] / 1e6, "output": PRICES[f][2] / 1e6,
                       "cached_input": PRICES[f][1] / 1e6})
        for f in FAMILIES]
    assert {m["context_length"] for m in data} == {256}


def test_a_model_that_is_not_served_is_a_404_naming_the_served_ids(multi_server):
    r = httpx.post(multi_server.v1 + "/chat/completions",
                   json={"model": "tiny/nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert error["message"].endswith(
        "Served models: " + ", ".join(model_id(f) for f in FAMILIES) + ".")


def test_chat_streams_from_the_chosen_model(multi_server):
    body = {"model": model_id("qwen2"), "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", multi_server.v1 + "/chat/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert {e["model"] for e in events} == {model_id("qwen2")}
    assert events[-1]["usage"]["completion_tokens"] == 8
