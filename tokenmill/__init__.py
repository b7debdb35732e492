"""tokenmill: a self-hosted LLM inference platform with its own continuous-batching engine."""

from tokenmill.config import EngineConfig
from tokenmill.llm import LLM, Completion, GenerationResult
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "Completion", "EngineConfig", "GenerationResult", "SamplingParams"]
