"""A scripted stand-in for AsyncLLM (same interface) so route logic tests run in milliseconds.

Tokens are characters: id = ord(c). Every choice replies REPLY one character per output, so the
expected text, usage and logprobs are known exactly.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

from tokenmill.catalog.catalog import CatalogEntry, ModelSource
from tokenmill.catalog.pricing import Price
from tokenmill.engine.async_llm import EngineDeadError
from tokenmill.engine.llm_engine import PromptError
from tokenmill.engine.outputs import RequestOutput, TokenLogprobs
from tokenmill.server.models import ServedModel

REPLY = "Hello there, friend."


class CharTokenizer:
    chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")
    bos_token = eos_token = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@dataclass
class Stats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


class FakeEngine:
    def __init__(self, max_model_len: int = 256, delay: float = 0.0):
        self.tokenizer = CharTokenizer()
        self.model_config = SimpleNamespace(vocab_size=1000, eos_token_ids=(0,))
        self.max_model_len = max_model_len
        self.delay = delay  # seconds between outputs
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.calls: list[tuple[list[int], object, str]] = []
        self.healthy = True
        self.fail_after: int | None = None  # raise `failure` after this many outputs
        self.failure: type[Exception] = EngineDeadError
        self.engine = self  # AsyncLLM.engine, the LLMEngine: routes call its check_prompt

    def check_prompt(self, prompt_token_ids, params):
        """LLMEngine.check_prompt's rules."""
        if not prompt_token_ids:
            raise PromptError("the prompt is empty")
        if any(not 0 <= t < self.model_config.vocab_size for t in prompt_token_ids):
            raise PromptError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        if len(prompt_token_ids) + (params.max_tokens or 1) > self.max_model_len:
            raise PromptError("too long for the context")

    async def generate(self, prompt_token_ids, params, request_id):
        self.calls.append((list(prompt_token_ids), params, request_id))
        self.running.add(request_id)
        finished = 0
        try:
            reply = REPLY
            for stop in params.stop:
                if stop in reply:
                    reply = reply[:reply.index(stop)]
            limit = min(len(reply), params.max_tokens)
            for pos in range(limit):
                for index in range(params.n):
                    await asyncio.sleep(self.delay)
                    if self.fail_after is not None and pos >= self.fail_after:
                        raise self.failure("step failed: boom")
                    last = pos == limit - 1
                    tok = ord(reply[pos])
                    lp = []
                    if params.logprobs is not None:
                        top = [(tok, -0.5), (ord("x"), -1.5)][:params.logprobs]
                        lp = [TokenLogprobs(tok, -0.5, top)]
                    reason = None
                    if last:
                        reason = "length" if params.max_tokens < len(reply) else "stop"
                    finished += last
                    yield RequestOutput(request_id, index, [tok], reply[pos], lp, reason, None,
                                        len(prompt_token_ids), 0, pos + 1)
        finally:
            self.running.discard(request_id)
            if finished < params.n:
                self.aborted.append(request_id)

    def abort(self, request_id):
        pass

    def stats(self):
        return Stats(num_running=len(self.running))

    def is_healthy(self):
        return self.healthy

    async def shutdown(self):
        pass


def served(engine, model_id: str = "fake-model",
           price: Price = Price(input=20_000, output=40_000)) -> ServedModel:
    """`engine` served under `model_id` at `price` (micro-USD per 1M tokens)."""
    entry = CatalogEntry(id=model_id, name=model_id, summary="", card="", family="llama",
                         template=None, context_length=engine.max_model_len, price=price,
                         source=ModelSource(path="/nonexistent"), hardware="")
    return ServedModel(id=model_id, engine=engine, entry=entry)
