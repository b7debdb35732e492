"""Which kernel runs the model's linears on this CPU, chosen by measurement.

`--quantization` says how weights may be stored (none: float32, oneDNN-prepacked; bf16; int8 or
int4 weight-only; auto: chosen from the source's precision and the CPU, `auto_quantization`);
within that, the best kernel depends on the CPU and on the row count M: the
weight-only int kernels win at decode sizes, bfloat16 matmuls (AMX, AVX-512 BF16) from some M up
(docs/BENCHMARKS.md). So
`calibrate` times each allowed kernel on the model's own linear shapes at a few row counts, keeps
the fastest at M = 1 for decode-sized inputs and the fastest at the largest M for the rest, and
the largest M the first still wins as the threshold between them (`RowDispatch`). A plan takes a
few seconds to measure; it is cached in $TOKENMILL_HOME/cache/linear-plans by CPU, torch
version, threads, shapes and quantization, and logged once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tokenmill.runner.cpu_linear import PackedLinear
from tokenmill.runner.quant_linear import Bf16Linear, Int4Linear, Int8Linear, RowDispatch

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "bf16", "int8", "int4")
# quantization -> the kernels its weights may run through. The int modes may keep a bfloat16
# copy for large M (0.5 or 1 byte a weight, plus 2).
CANDIDATES = {"none": ("fp32-onednn",), "bf16": ("bf16",),
              "int8": ("int8", "bf16"), "int4": ("int4", "bf16")}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # the row counts measured
POOL_BYTES = 128 << 20  # of float32 weight per shape timed, so that it is read from memory
REPEATS = 5
_PLAN_FORMAT = 1  # bumped when what a plan means changes


BUILDERS = {"fp32-onednn": PackedLinear, "bf16": Bf16Linear, "int8": Int8Linear.quantize,
            "int4": Int4Linear.quantize}


def kernel_for(kernel: str, shape: tuple[int, int], head: bool = False) -> str:
    """`kernel`, or the next wider one where it cannot hold the weight: int4 -> int8 for a
    shape its layout does not take or an LM head (`head`, see LinearPlan.build); int8 -> bf16
    for a shape its kernel does not take."""
    if kernel == "int4" and (head or not Int4Linear.supports(*shape)):
        kernel = "int8"
    if kernel == "int8" and not Int8Linear.supports(*shape):
        kernel = "bf16"
    return kernel


@dataclass(frozen=True)
class LinearPlan:
    quantization: str  # none | bf16 | int8 | int4
    small: str  # the kernel for inputs of at most `threshold` rows (a BUILDERS key)
    large: str  # the kernel above it (== small: one kernel for every M)
    threshold: int
    ms: dict  # kernel -> {M: ms over the model's linears}, what the choice was made from

    def describe(self) -> str:
        if self.small == self.large:
            return f"{self.quantization}: {self.small} for every row count"
        return (f"{self.quantization}: {self.small} up to {self.threshold} rows, "
                f"{self.large} above")

    def build(self, weight: Tensor, bias: Tensor | None = None,
              head: bool = False) -> nn.Module:
        """The module for one linear's weight [N, K] under this plan. The LM head is never
        below int8 (`head`): its rows are compared with each other for every token, and GGUF
        files keep it at 6 or 8 bits where their layers are at 4 (llama.cpp's choice too;
        measured: int4 heads cost 10 points of greedy agreement on the default model)."""
        small, large = (kernel_for(k, tuple(weight.shape), head) for k in (self.small, self.large))
        if small == large:
            return BUILDERS[small](weight, bias)
        return RowDispatch(BUILDERS[small](weight, bias), BUILDERS[large](weight, bias),
                           self.threshold)


def linear_shapes(model: nn.Module) -> Counter:
    """(N, K) -> how many linears of the model have that weight shape (a tied LM head too)."""
    shapes = Counter(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear))
    if getattr(model, "lm_head", False) is None:  # tied: the embedding is the head's weight
        shapes[tuple(model.model.embed_tokens.weight.shape)] += 1
    return shapes


def _time_kernel(kernel: str, shapes: Counter, rows: tuple[int, ...]) -> dict[int, float]:
    """ms for one pass over `shapes` (each counted as often as the model has it) at each M.

    A model's weights do not sit in the CPU's caches between one use and the next, so each
    shape is timed over distinct copies of its weight (as many as the model has, up to
    POOL_BYTES of float32 per shape) and scaled to the model's count."""
    gen = torch.Generator().manual_seed(0)
    pools = {}
    for (n, k), count in shapes.items():
        copies = max(1, min(count, POOL_BYTES // (n * k * 4)))
        build = BUILDERS[kernel_for(kernel, (n, k))]
        pools[(n, k)] = [build(torch.randn(n, k, generator=gen) * 0.02) for _ in range(copies)]
    result = {}
    with torch.inference_mode():
        for m in rows:
            total = 0.0
            for (n, k), count in shapes.items():
                x, pool = torch.randn(m, k, generator=gen), pools[(n, k)]
                for module in pool:  # warm-up: the kernel's per-shape set-up
                    module(x)
                times = []
                for _ in range(REPEATS):
                    start = time.perf_counter()
                    for module in pool:
                        module(x)
                    times.append(time.perf_counter() - start)
                total += statistics.median(times) * count / len(pool)
            result[m] = total * 1000
    return result


def calibrate(quantization: str, shapes: Counter) -> LinearPlan:
    """Measure every kernel `quantization` allows on `shapes` and choose between them."""
    return choose(quantization, {kernel: _time_kernel(kernel, shapes, ROWS)
                                 for kernel in CANDIDATES[quantization]})


def choose(quantization: str, ms: dict[str, dict[int, float]]) -> LinearPlan:
    """From kernel -> {M: ms}: the fastest at the smallest M for small inputs, the fastest at
    the largest M for the rest, switching at the first M where the second is faster."""
    rows = sorted(next(iter(ms.values())))
    small = min(ms, key=lambda k: ms[k][rows[0]])
    large = min(ms, key=lambda k: ms[k][rows[-1]])
    threshold = rows[0]
    for m in rows[1:]:
        if ms[small][m] > ms[large][m]:
            break
        threshold = m
    return LinearPlan(quantization, small, large, threshold, ms)


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and flags (from /proc/cpuinfo where there is one)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # bfloat16 matmuls run natively


def cpu_signature() -> str:
    """The CPU's model name and the flags that choose kernels."""
    name, flags = cpu_info()
    return f"{name} [{' '.join(f for f in KERNEL_FLAGS if f in flags)}]"


def auto_quantization(weight_bits: float, cpu_flags: set[str] | None = None) -> tuple[str, str]:
    """What `--quantization auto` means for a model whose source stores its layer weights at
    `weight_bits` bits, on a CPU with `cpu_flags` (None: this one's), and why.

    A GGUF's own 4- or 8-bit weights stay that narrow: int4's layout (4 bits and a bfloat16
    scale and zero per 32) is Q4_1's, so it costs little the file had not already lost, and at
    decode sizes it reads a fifth of float32's bytes (docs/BENCHMARKS.md). Float weights go to
    bfloat16 where the CPU multiplies it natively (AMX, AVX-512 BF16) and stay float32
    elsewhere, where bfloat16 is converted in software."""
    if cpu_flags is None:
        cpu_flags = cpu_info()[1]
    if weight_bits <= 5.0:
        return "int4", f"the source's layer weights are {weight_bits:g} bits each"
    if weight_bits <= 8.5:
        return "int8", f"the source's layer weights are {weight_bits:g} bits each"
    if cpu_flags & BF16_FLAGS:
        return "bf16", (f"{weight_bits:g}-bit float weights on a CPU with "
                        f"{', '.join(sorted(cpu_flags & BF16_FLAGS))}")
    return "none", f"{weight_bits:g}-bit float weights and no bfloat16 matmul units"


def resolve_quantization(requested: str, weight_bits: float,
                         float32_on_cpu: bool) -> tuple[str, str]:
    """(the quantization `requested` stands for, why auto chose it or ''): auto is
    `auto_quantization` for a float32 model on the CPU, none for any other."""
    if requested != "auto":
        return requested, ""
    if not float32_on_cpu:
        return "none", "quantization applies to float32 models on the CPU only"
    return auto_quantization(weight_bits)


def kv_cache_dtype(quantization: str, model_dtype: torch.dtype,
                   cpu_flags: set[str] | None = None) -> torch.dtype:
    """bfloat16 where the linears already take bfloat16 activations (every quantization but
    none) and the CPU computes bfloat16 natively: attention then reads half the bytes and runs
    on the bfloat16 units (docs/BENCHMARKS.md); the model's dtype otherwise."""
    if cpu_flags is None:
        cpu_flags = cpu_info()[1]
    if quantization != "none" and model_dtype == torch.float32 and cpu_flags & BF16_FLAGS:
        return torch.bfloat16
    return model_dtype


def plan_for(quantization: str, shapes: Counter, cache_dir: Path | None) -> LinearPlan:
    """The cached plan for this CPU, torch, thread count, shapes and quantization, else a new
    measurement (cached when `cache_dir` is writable)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not "
                         f"{quantization!r}")
    kernels = CANDIDATES[quantization]
    if len(kernels) == 1:  # nothing to choose between: nothing to measure or cache
        return LinearPlan(quantization, kernels[0], kernels[0], ROWS[-1], {})
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"quantization {quantization!r} needs torch's CPU int4/int8 kernels "
                         f"(torch >= 2.6), not torch {torch.__version__}")
    ident = json.dumps([_PLAN_FORMAT, cpu_signature(), torch.__version__,
                        torch.get_num_threads(), sorted(shapes.items()), quantization])
    path = None if cache_dir is None else \
        cache_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:20]}.json"
    if path is not None and path.is_file():
        try:
            data = json.loads(path.read_text())
            data["ms"] = {k: {int(m): v for m, v in by_m.items()}
                          for k, by_m in data["ms"].items()}
            return LinearPlan(**data)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring the unreadable linear plan %s (%s): measuring again", path,
                        exc)
    log.info("measuring the linear kernels for quantization %s on %s (once per machine)",
             quantization, cpu_signature())
    plan = calibrate(quantization, shapes)
    if path is not None:
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(asdict(plan), indent=1))
            os.replace(partial, path)  # atomic: a reader sees a whole plan or none
        except OSError as exc:  # a read-only home costs a measurement next time
            log.debug("not caching the linear plan at %s: %s", path, exc)
    return plan


def apply_plan(model: nn.Module, plan: LinearPlan) -> int:
    """Replace every nn.Linear of `model` (and a tied LM head) by `plan`'s module, in place,
    one at a time (each float32 weight can be freed once its replacement exists); returns how
    many."""
    slots = [(module, name) for module in model.modules()
             for name, child in module.named_children() if isinstance(child, nn.Linear)]
    for module, name in slots:
        linear = getattr(module, name)
        head = module is model and name == "lm_head"
        setattr(module, name, plan.build(linear.weight, linear.bias, head))
    if getattr(model, "lm_head", False) is None:
        model.lm_head = plan.build(model.model.embed_tokens.weight, head=True)
        slots.append((model, "lm_head"))
    return len(slots)
