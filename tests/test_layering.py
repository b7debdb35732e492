"""The import graph matches docs/ARCHITECTURE.md's layers: each package imports only the
packages below it, and the places where a lower layer reaches up are exactly the documented
ones (the runner reads the engine's boundary objects; the models call the runner's attention; the
loader cuts tensor-parallel shards with distributed/parallel_linear.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "tokenmill"

# package -> the tokenmill packages and top-level modules it may import
ALLOWED = {
    "web": {"server", "catalog"},
    "bench": {"models"},  # a client: HTTP to any server, a tokenizer from models/
    "server": {"platform", "catalog", "engine", "prompts", "sampling_params", "config"},
    "platform": {"catalog", "models"},
    "catalog": {"models"},
    "prompts": {"catalog"},
    "llm": {"catalog", "engine", "models", "prompts", "sampling_params", "config"},
    # engine replicas on Ray Serve, seen by the server as engines (only the CLI wires it in)
    "scaleout": {"engine", "models", "sampling_params", "config"},
    "engine": {"distributed", "runner", "models", "sampling_params", "config"},
    "distributed": {"runner", "models", "config"},  # beside runner/ and models/, below engine/
    "runner": {"engine", "models", "config"},
    "models": {"distributed", "runner", "config"},
    "config": set(),
    "sampling_params": set(),
}
# The documented reaches upward: module -> the only modules of the upper package it may import.
UPWARD = {
    ("runner", "engine"): {"tokenmill.engine.request", "tokenmill.engine.outputs"},
    ("models", "runner"): {"tokenmill.runner.attention"},
    # the loader cuts a tensor-parallel rank's shard of each weight
    ("models", "distributed"): {"tokenmill.distributed.parallel_linear"},
}


def imports() -> list[tuple[str, str, str]]:
    """(importing package, imported package, imported module) for every tokenmill import."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        source = parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                names = module.split(".")
                if names[0] == "tokenmill" and len(names) > 1 and names[1] != source:
                    found.append((source, names[1], module))
    return found


def test_every_package_imports_only_the_layers_the_architecture_allows():
    wrong = sorted({(source, target) for source, target, _ in imports()
                    if source in ALLOWED and target not in ALLOWED[source]})
    assert wrong == []


def test_lower_layers_reach_up_only_for_the_documented_modules():
    wrong = sorted({(source, module) for source, target, module in imports()
                    if (source, target) in UPWARD and module not in UPWARD[(source, target)]})
    assert wrong == []
