"""The offline API: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`.

It drives LLMEngine.step() in the caller's thread until every request is finished, then returns
one GenerationResult per prompt, in prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from tokenmill.catalog.templates import BUILTIN_TEMPLATES, ChatTemplate
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.models.default import default_model_path
from tokenmill.prompts import Messages, encode_prompt, render_chat
from tokenmill.sampling_params import SamplingParams


@dataclass
class Completion:
    index: int  # choice index (n > 1)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]  # one per choice, by index
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


class LLM:
    def __init__(self, model: str | None = None, chat_template: str | None = None,
                 **engine_options):
        """`chat_template`: the built-in template (BUILTIN_TEMPLATES) for a checkpoint that has
        no template of its own; the checkpoint's own always wins."""
        self.engine = LLMEngine(EngineConfig(model=model or str(default_model_path()),
                                             **engine_options))
        self.tokenizer = self.engine.tokenizer
        self.chat_template = ChatTemplate.for_tokenizer(self.tokenizer, chat_template)
        self._next_id = 0

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | None = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        """Complete raw prompts (text, or token ids used as they are)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else encode_prompt(self.tokenizer, p) for p in prompts]
        return self._run(ids, params or SamplingParams(), use_tqdm)

    def chat(self, messages: Messages | list[Messages], params: SamplingParams | None = None,
             use_tqdm: bool = False, tools: list[dict] | None = None) -> list[GenerationResult]:
        """Complete conversations rendered with the model's chat template (`tools`: OpenAI
        function schemas, for templates that take them)."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template: name a built-in one with "
                             f"LLM(..., chat_template=...) ({', '.join(BUILTIN_TEMPLATES)}), or "
                             "use generate() with raw prompts")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [render_chat(self.chat_template, self.tokenizer, m, tools) for m in conversations]
        return self._run(ids, params or SamplingParams(), use_tqdm)

    def _run(self, prompt_ids: list[list[int]], params: SamplingParams,
             use_tqdm: bool) -> list[GenerationResult]:
        results: dict[str, GenerationResult] = {}
        for ids in prompt_ids:
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, ids, params)
            results[request_id] = GenerationResult(
                request_id, ids, [Completion(i) for i in range(params.n)])
        progress = tqdm(total=len(results) * params.n, disable=not use_tqdm, desc="generating")
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                result = results[out.request_id]
                result.num_cached_tokens = out.num_cached_tokens
                choice = result.completions[out.index]
                choice.text += out.text
                choice.token_ids += out.new_token_ids
                choice.logprobs += out.logprobs
                if out.finished:
                    choice.finish_reason, choice.stop_reason = out.finish_reason, out.stop_reason
                    progress.update(1)
        progress.close()
        return list(results.values())
