"""POST /v1/completions: one prompt or a list of them (strings or token ids), n choices each.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API.
"""

from __future__ import annotations

from tokenmill.engine.outputs import TokenLogprobs
from tokenmill.prompts import encode_prompt
from tokenmill.server.errors import not_supported
from tokenmill.server.models import ServedModel
from tokenmill.server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs,
                                       CompletionRequest, CompletionResponse, Usage)
from tokenmill.server.serving import Job, OpenAIServing, clean_logprob, utf8_bytes
from tokenmill.server.state import Demand


class CompletionServing(OpenAIServing):
    endpoint = "completions"
    id_prefix = "cmpl"

    def check_supported(self, req: CompletionRequest) -> None:
        if req.suffix:
            raise not_supported("suffix", "suffix (fill-in-the-middle)")
        if req.best_of is not None and req.best_of != req.n:
            raise not_supported("best_of", "best_of other than n")
        if req.echo and req.logprobs is not None:
            raise not_supported("echo", "echo together with logprobs (prompt logprobs)")

    def demand(self, model: ServedModel, req: CompletionRequest) -> Demand:
        # Token ids count themselves; a string is bounded by its UTF-8 bytes.
        prompts = [len(each) if not isinstance(each, str) else
                   utf8_bytes(each, "prompt" if each is req.prompt else f"prompt.{i}")
                   for i, each in enumerate(prompt_list(req.prompt))]
        prompt_tokens = sum(prompts) + len(prompts)  # + a BOS each
        sequences = len(prompts) * req.n
        completion = sequences * self.max_tokens_bound(model, req)
        return Demand(sequences, req.n * prompt_tokens + completion)

    def prepare(self, model: ServedModel, req: CompletionRequest) -> Job:
        """Token ids of each prompt, checked; with `echo`, the client's own string before its
        choices (or the decoded ids of a token-id prompt)."""
        given = prompt_list(req.prompt)
        texts = given if isinstance(given[0], str) else None
        if texts is not None:
            prompts = [encode_prompt(model.tokenizer, text) for text in texts]
        else:
            prompts = [list(ids) for ids in given]
        params = self.sampling_params(model, req, max(len(ids) for ids in prompts), "prompt")
        self.check_prompts(model, prompts, params, "prompt")
        if not req.echo:
            return Job(model=model, prompts=prompts, params=params, echo=[""] * len(prompts))
        if texts is None:  # ids are in the vocabulary by now
            texts = [model.tokenizer.decode(ids) for ids in prompts]
        return Job(model=model, prompts=prompts, params=params, echo=texts)

    def logprobs(self, job: Job, entries: list[TokenLogprobs], k: int,
                 offset: int) -> CompletionLogprobs:
        tokens, token_logprobs, top, offsets = [], [], [], []
        token_text = job.model.token_text
        for e in entries:
            text = token_text(e.token_id)
            tokens.append(text)
            token_logprobs.append(clean_logprob(e.logprob))
            top.append({token_text(i): clean_logprob(lp) for i, lp in e.top[:k]})
            offsets.append(offset)
            offset += len(text)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top,
                                  text_offset=offsets)

    def choice(self, index: int, text: str, logprobs: CompletionLogprobs | None,
               finish_reason: str | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=finish_reason)

    def response(self, job: Job, request_id: str, choices: list[CompletionChoice],
                 usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=job.model.id, choices=choices,
                                  usage=usage, system_fingerprint=job.model.fingerprint)

    def delta_choice(self, index: int, text: str | None, logprobs: CompletionLogprobs | None,
                     finish_reason: str | None) -> CompletionChoice:
        return self.choice(index, text or "", logprobs, finish_reason)

    def chunk(self, job: Job, request_id: str, created: int, choices: list[CompletionChoice],
              usage: Usage | None) -> CompletionChunk:
        return CompletionChunk(id=request_id, created=created, model=job.model.id,
                               system_fingerprint=job.model.fingerprint, choices=choices,
                               usage=usage)


def prompt_list(prompt) -> list:
    """The request's `prompt` as a list of prompts, each a string or a list of token ids."""
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)
