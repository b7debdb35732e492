"""Loading never needs twice the model's memory, and `auto` picks bfloat16 on CPU above 1B
parameters (issue 7, "Loading")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tokenmill.config import BF16_ON_CPU_ABOVE, ModelConfig, resolve_dtype
from tokenmill.models.loader import open_model
from tokenmill.models.registry import model_class

CPU = torch.device("cpu")
MIB = 1 << 20

# A bf16 Llama of 75M parameters (150 MB) in 4 shards of at most 48 MB: big enough that a second
# copy of the weights, or a shard's worth of mapped file, would break the bound below.
SHAPE = dict(vocab_size=16000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
             num_attention_heads=12, num_key_value_heads=4)
# embed + lm_head 2 * 16000 * 768; per layer q, o 768^2, k, v 768 * 256, MLP 3 * 768 * 2048 and
# two norms of 768; the final norm.
NUM_PARAMETERS = 2 * 16000 * 768 + 8 * (2 * 768**2 + 2 * 768 * 256 + 3 * 768 * 2048 + 2 * 768) + 768

# Runs in a fresh process: opens the model (imports, config, tokenizer, the meta-device model),
# takes that RSS as the baseline, resets the peak (VmHWM := VmRSS), loads the weights, reports.
CHILD = """
import json, sys
from pathlib import Path
import torch
from tokenmill.models.loader import load_weights, open_model

def status(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

opened = open_model(sys.argv[1])
baseline, anon = status("VmRSS"), status("RssAnon")
Path("/proc/self/clear_refs").write_text("5")
model = load_weights(opened, getattr(torch, sys.argv[2]), torch.device("cpu")).model
print(json.dumps(dict(peak=status("VmHWM") - baseline, anon=status("RssAnon") - anon,
                      weights=sum(p.nbytes for p in model.parameters()))))
"""


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The SHAPE checkpoint, random bf16 weights, sharded, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("bf16_llama")
    config = LlamaConfig(**SHAPE, max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="48MB")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                            bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            ).save_pretrained(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    return path


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_rss_of_a_sharded_load_stays_within_115_percent_of_the_weights(bf16_checkpoint,
                                                                             dtype):
    out = subprocess.run([sys.executable, "-c", CHILD, str(bf16_checkpoint), dtype], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    r = json.loads(out)
    assert r["weights"] == NUM_PARAMETERS * getattr(torch, dtype).itemsize
    # The weights are resident in anonymous memory, read rather than left file-backed in a
    # mapping (95%: some allocations reuse heap pages already resident at the baseline)...
    assert r["anon"] >= 0.95 * r["weights"]
    # ...and the load never held more than 15% beyond them (+ 4 MiB of allocator slack).
    assert r["peak"] <= 1.15 * r["weights"] + 4 * MIB


def test_auto_dtype_on_cpu_is_bfloat16_only_above_1b_parameters():
    assert BF16_ON_CPU_ABOVE == 1_000_000_000
    assert resolve_dtype("auto", CPU, 1_000_000_000) == torch.float32
    assert resolve_dtype("auto", CPU, 1_000_000_001) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda"), 135_000_000) == torch.bfloat16
    assert resolve_dtype("float32", CPU, 70_000_000_000) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", CPU, 1)


def meta_parameters(hf_config) -> tuple[int, int]:
    """(ours, transformers') parameter counts of a config, both built on the meta device."""
    from transformers import AutoModelForCausalLM

    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        ours = model_class(config)(config)
        theirs = AutoModelForCausalLM.from_config(hf_config)
    return (sum(p.numel() for p in ours.parameters()),
            sum(p.numel() for p in theirs.parameters()))


def test_a_1_1b_llama_resolves_to_bfloat16_on_cpu():
    from transformers import LlamaConfig

    # TinyLlama-1.1B's shape: 1,100,048,384 parameters.
    tiny_llama = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                             max_position_embeddings=2048, tie_word_embeddings=False)
    assert meta_parameters(tiny_llama) == (1_100_048_384, 1_100_048_384)
    assert resolve_dtype("auto", CPU, 1_100_048_384) == torch.bfloat16


def test_the_default_model_and_a_tiny_checkpoint_stay_float32_on_cpu(default_model_path,
                                                                      tiny_checkpoint):
    from transformers import AutoConfig

    default = open_model(str(default_model_path))
    assert default.num_parameters() == 134_515_008  # SmolLM2-135M, tied embeddings
    assert resolve_dtype("auto", CPU, default.num_parameters()) == torch.float32
    path = tiny_checkpoint("llama")
    tiny = open_model(str(path))
    assert tiny.num_parameters() == meta_parameters(AutoConfig.from_pretrained(path))[1]
    assert resolve_dtype("auto", CPU, tiny.num_parameters()) == torch.float32
    assert {p.device.type for p in tiny.model.parameters()} == {"meta"}
