"""tokenmill: a self-hosted LLM inference platform with its own continuous-batching engine."""

import importlib.metadata

from tokenmill.config import EngineConfig
from tokenmill.llm import LLM, Completion, GenerationResult
from tokenmill.sampling_params import SamplingParams

try:
    __version__ = importlib.metadata.version("tokenmill")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LLM", "Completion", "EngineConfig", "GenerationResult", "SamplingParams"]
