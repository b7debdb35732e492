"""The Makefile's set-up of torch: the CPU build from PyTorch's own index (TORCH_INDEX, which a
command line may override), failing fast where that index is unreachable and then falling back
to pip's configured index. Checked with make's dry run, and by running the recipe with a stand-in
`python` that records its arguments: nothing is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", *args],
                          capture_output=True, text=True, timeout=60,
                          env=None if env is None else {**os.environ, **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def torch_line(dry_run: str) -> str:
    """The torch command of a dry run, its continued lines joined."""
    joined = re.sub(r"\\\n\s*", "", dry_run)
    [line] = [line for line in joined.splitlines() if "--index-url" in line]
    return line


def test_the_default_installs_torch_from_the_cpu_index_and_falls_back_to_pip():
    line = torch_line(make("-n", "-B", ".venv/bin/.installed"))
    torch = re.search(r"--index-url \S+ '(torch[^']*)'", line).group(1)
    assert f"--timeout 10 --retries 0 --index-url {CPU_INDEX} '{torch}'" in line
    # The fallback: the same requirement from pip's configured index, once the first one fails.
    head, _, fallback = line.partition(" || ")
    assert "pip install" in head and fallback.endswith(f"-m pip install -q '{torch}'; }}")


def test_torch_index_and_torch_can_be_overridden():
    mirror = "https://mirror.example/whl/cpu"
    line = torch_line(make("-n", "-B", ".venv/bin/.installed", f"TORCH_INDEX={mirror}",
                           "TORCH=torch==2.13.1"))
    assert f"--index-url {mirror} 'torch==2.13.1'" in line and CPU_INDEX not in line
    assert line.endswith("-m pip install -q 'torch==2.13.1'; }")


@pytest.mark.parametrize("index_reachable", [True, False])
def test_the_recipe_falls_back_only_when_the_index_fails(tmp_path, index_reachable):
    """The recipe run for real against a throwaway VENV whose `python` only logs its arguments
    and, to stand for an unreachable index, fails when given --index-url."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$FAKE_LOG"\n'
                    'case "$*" in *--index-url*) [ -n "$FAKE_INDEX_DOWN" ] && exit 1;; esac\n'
                    'exit 0\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(fake, venv / "bin" / "python")
    out = make("-s", f"{venv}/bin/.installed", f"VENV={venv}", f"PYTHON={fake}",
               env={"FAKE_LOG": str(log), "FAKE_INDEX_DOWN": "" if index_reachable else "1"})
    calls = log.read_text().splitlines()
    torch_calls = [c for c in calls if "torch==" in c]
    assert torch_calls[0].endswith(f"--index-url {CPU_INDEX} torch==2.13.0")
    if index_reachable:
        assert len(torch_calls) == 1 and "unreachable" not in out
    else:
        assert torch_calls[1] == "-m pip install -q torch==2.13.0"
        assert f"{CPU_INDEX} unreachable" in out
    assert calls[-1] == "-m pip install -q -e .[test]"  # then the project, either way
    assert (venv / "bin" / ".installed").exists()
