"""Peak memory of loading a model: peak RSS while its weights load, against the weights' bytes.

    .venv/bin/python benchmarks/bench_load.py                  # checkpoint in a temporary dir
    .venv/bin/python benchmarks/bench_load.py --dir /tmp/ckpt  # written once, kept for reruns

Writes a random-weight Llama-shaped checkpoint in bfloat16 safetensors, sharded like a real
release (hidden 2048, 22 layers, intermediate 5632, GQA 32/4, the default model's tokenizer and
its vocabulary of 49152: 1.17B parameters, 2.3 GB in three shards of at most 1 GiB), shard by
shard so that the writer never holds the whole model. Each case runs in a fresh process:
`open_model` first (imports, config, tokenizer, the model on the meta device), whose RSS is the
baseline; then the peak is reset (`/proc/self/clear_refs`) and `load_weights` runs. The peak is
VmHWM, exact, and counts the file-backed pages of mapped files too. Cases: that checkpoint in
bfloat16 (what `auto` picks on CPU above 1B parameters) and float32; the default model's GGUF in
float32; and a whole float32 `LLMEngine` on it (load, then oneDNN packing of the linears), whose
64 MiB KV cache is subtracted. "Weights" are the served tensors' bytes (packed ones included).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 1 << 20
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4)
SHARD_BYTES = 1 << 30  # like HF's max_shard_size: a shard is a large share of the model


def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def tensor_shapes(c) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of a Llama checkpoint with config `c`, in HF names and file order."""
    h, i, d = c.hidden_size, c.intermediate_size, c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * d
    shapes = [("model.embed_tokens.weight", (c.vocab_size, h))]
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (i, h)),
                   (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (c.vocab_size, h))]


def write_checkpoint(path: Path) -> None:
    """A sharded bf16 checkpoint with an index, config.json and the default model's tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from tokenmill.models.default import default_model_path
    from tokenmill.models.gguf_loader import load_gguf_config_and_tokenizer

    tokenizer = load_gguf_config_and_tokenizer(default_model_path())[1]
    config = LlamaConfig(**SHAPE, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(config):
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].nbytes
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {file} ({len(shard)} tensors)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "complete").touch()  # a checkpoint interrupted while written is rewritten


def child(spec: str, dtype_name: str, engine: bool) -> None:
    """In a fresh process: open the model, take the baseline, reset the peak, load, report."""
    from tokenmill.models.loader import load_weights, open_model

    opened = open_model(spec)  # imports, config, tokenizer, the meta-device model: the baseline
    if engine:
        from tokenmill.config import EngineConfig
        from tokenmill.engine.llm_engine import LLMEngine
        opened = None  # the engine opens the model itself
    gc.collect()
    baseline = proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    if engine:
        built = LLMEngine(EngineConfig(model=spec, dtype=dtype_name, device="cpu",
                                       kv_cache_gib=0.0625, max_model_len=1024))
        model, kv_bytes = built.runner.model, built.runner.kv_cache.nbytes
    else:
        model = load_weights(opened, getattr(torch, dtype_name), torch.device("cpu")).model
        kv_bytes = 0
    seconds = time.perf_counter() - started
    print(json.dumps(dict(
        baseline=baseline, peak=proc_status("VmHWM"), rss=proc_status("VmRSS"),
        weights=served_bytes(model), kv=kv_bytes, seconds=seconds)))


def served_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters, and of the oneDNN tensors of packed linears (not parameters)."""
    packed = [t for m in model.modules() for t in (getattr(m, "packed_weight", None),
                                                   getattr(m, "packed_bias", None))
              if t is not None]
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *packed))


def measure(spec: Path, dtype: str, engine: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(spec), dtype] + (["--engine"] if engine else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="checkpoint directory, written once and kept")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, engine=args.engine)
    from tokenmill.models.default import default_model_path

    print(f"CPU: {cpu_model()}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        ckpt = args.dir or Path(tmp) / "llama-1.2b-bf16"
        if not (ckpt / "complete").exists():
            print(f"writing the checkpoint to {ckpt}", flush=True)
            write_checkpoint(ckpt)
        cases = [(ckpt, dtype, False) for dtype in args.dtypes.split(",")]
        cases += [(default_model_path(), "float32", False), (default_model_path(), "float32", True)]
        rows = []
        for spec, dtype, engine in cases:
            what = f"{'LLMEngine' if engine else 'load_weights'} {spec.name} {dtype}"
            print(f"measuring {what}", flush=True)
            r = measure(spec, dtype, engine)
            over = r["peak"] - r["baseline"] - r["kv"]
            after = r["rss"] - r["baseline"] - r["kv"]
            rows.append((what, r["weights"] / MIB, r["baseline"] / MIB, after / MIB, over / MIB,
                         over / r["weights"], r["seconds"]))
    print("\n| case | weights MiB | baseline RSS MiB | RSS after - baseline MiB | "
          "peak - baseline MiB | peak / weights | s |")
    print("|---|---|---|---|---|---|---|")
    for what, w, base, after, over, ratio, s in rows:
        print(f"| {what} | {w:.0f} | {base:.0f} | {after:.0f} | {over:.0f} | {ratio:.2f} "
              f"| {s:.1f} |")


if __name__ == "__main__":
    main()
