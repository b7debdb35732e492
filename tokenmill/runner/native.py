"""Native CPU kernels (tokenmill/runner/csrc), compiled on first use by torch.utils.cpp_extension.

Each kernel is built once per machine and kept: the build directory is named by a hash of the
source, the torch and Python versions and the CPU's flags (the code is compiled for this CPU,
`-march=native`), under $TORCH_EXTENSIONS_DIR when set, else $TOKENMILL_HOME/cache/extensions.
The first start on a machine spends about half a minute compiling (logged with its time); later
starts load the library in well under a second. Where no compiler is at hand, or
TOKENMILL_NATIVE_KERNELS=0, the loader says so in one log line and returns None: the runner then
keeps its plain-PyTorch path, which computes the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tokenmill.models.default import tokenmill_home

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]  # OpenMP: at::parallel_for over torch's threads


@functools.cache
def paged_decode_attention():
    """torch.ops.tokenmill.paged_decode_attention (see csrc/paged_attention.cpp), or None when
    it cannot be built here."""
    return _load("paged_attention", "paged_decode_attention")


def _load(source: str, op: str):
    if os.environ.get("TOKENMILL_NATIVE_KERNELS", "1") == "0":
        log.info("native %s: off (TOKENMILL_NATIVE_KERNELS=0)", source)
        return None
    path = CSRC / f"{source}.cpp"
    build_dir = _build_root() / f"{source}-{_build_key(path)}"
    fresh = not (build_dir / f"tokenmill_{source}.so").exists()
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(f"tokenmill_{source}", [str(path)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only home: the PyTorch path stays
        reason = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
        log.warning("native %s unavailable (%s): using the plain-PyTorch path", source,
                    reason[0][:200])
        return None
    log.info("native %s: %s in %.1f s (%s)", source, "compiled" if fresh else "loaded",
             time.perf_counter() - start, build_dir)
    return getattr(torch.ops.tokenmill, op)


def _build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else tokenmill_home() / "cache" / "extensions"


def _build_key(path: Path) -> str:
    """What the compiled library depends on: its source, torch, Python and this CPU."""
    digest = hashlib.sha256(path.read_bytes())
    for part in (torch.__version__, sys.version, platform.machine(), " ".join(CFLAGS),
                 _cpu_flags()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the `ninja` package's binary sits in the venv,
    which is not on PATH when tokenmill is started as .venv/bin/tokenmill."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
