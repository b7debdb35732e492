"""Output processing: the last stage of a step, tokens -> RequestOutput.

For every request that got a token this step it detokenizes incrementally, looks for stop strings
across token boundaries, and builds the RequestOutput delta that the front end streams. It owns the
per-request text state; the scheduler owns everything else about a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import RequestOutput, RunnerOutput, TokenLogprobs
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.stop_strings import StopStringMatcher


@dataclass
class _TextState:
    request: Request
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    num_emitted_tokens: int = 0  # output tokens already turned into a RequestOutput
    done: bool = False  # its final RequestOutput was produced


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}  # engine request id -> text state
        self._groups: dict[str, list[str]] = {}  # user request id -> its choices' engine ids

    def add(self, requests: list[Request]) -> None:
        """Register the choices of one user request (all share a group_id)."""
        for req in requests:
            params = req.sampling_params
            self._states[req.request_id] = _TextState(
                req,
                IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                       params.skip_special_tokens),
                StopStringMatcher(params.stop),
            )
        self._groups[requests[0].group_id] = [r.request_id for r in requests]

    def has_group(self, group_id: str) -> bool:
        return group_id in self._groups

    def unfinished_ids(self, group_id: str) -> list[str]:
        return [rid for rid in self._groups.get(group_id, []) if not self._states[rid].done]

    def process(
        self, updated: list[Request], runner_output: RunnerOutput
    ) -> tuple[list[RequestOutput], list[str]]:
        """Turn this step's new tokens into outputs.

        Returns the outputs and the ids of requests that a stop string just finished: the caller
        must finish those in the scheduler (their outputs already say finish_reason "stop").
        """
        logprobs_by_id = dict(zip(runner_output.request_ids, runner_output.logprobs))
        outputs, stopped = [], []
        for req in updated:
            state = self._states.get(req.request_id)
            if state is None or state.done:
                continue
            out = self._make_output(state, logprobs_by_id.get(req.request_id))
            if out.finish_reason == "stop" and not req.is_finished:
                stopped.append(req.request_id)
            outputs.append(out)
        return outputs, stopped

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """Final outputs for aborted requests (their held-back text is dropped)."""
        outputs = []
        for rid in request_ids:
            state = self._states.get(rid)
            if state is not None and not state.done:
                outputs.append(self._finish(state, "", [], [], "abort", None))
        return outputs

    def _make_output(self, state: _TextState, logprobs: TokenLogprobs | None) -> RequestOutput:
        req = state.request
        new_ids = req.output_token_ids[state.num_emitted_tokens:]
        state.num_emitted_tokens = len(req.output_token_ids)
        # A stop token (EOS or stop_token_ids) ends the output but is never shown as text.
        stopped_by_token = req.status == RequestStatus.FINISHED_STOPPED and isinstance(
            req.stop_reason, int)
        text_ids = new_ids[:-1] if stopped_by_token else new_ids
        text, matched = state.stop_matcher.feed(state.detokenizer.step(text_ids))
        logprob_list = [logprobs] if logprobs is not None else []
        if matched is not None:
            req.stop_reason = matched
            return self._finish(state, text, new_ids, logprob_list, "stop", matched)
        if req.is_finished:  # release text held back for a partial character or stop string
            text += state.stop_matcher.feed(state.detokenizer.flush())[0]
            text += state.stop_matcher.flush()
            return self._finish(state, text, new_ids, logprob_list, req.finish_reason,
                                req.stop_reason)
        return self._output(state, text, new_ids, logprob_list, None, None)

    def _finish(self, state, text, new_ids, logprobs, finish_reason, stop_reason):
        state.done = True
        out = self._output(state, text, new_ids, logprobs, finish_reason, stop_reason)
        group = self._groups.get(state.request.group_id, [])
        if all(self._states[rid].done for rid in group):
            for rid in group:
                del self._states[rid]
            del self._groups[state.request.group_id]
        return out

    @staticmethod
    def _output(state, text, new_ids, logprobs, finish_reason, stop_reason) -> RequestOutput:
        req = state.request
        return RequestOutput(
            request_id=req.group_id,
            index=req.index,
            new_token_ids=list(new_ids),
            text=text,
            logprobs=logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=len(req.output_token_ids),
        )
