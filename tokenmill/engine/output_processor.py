"""Output processing: the last stage of a step, tokens -> RequestOutput.

For every request that got a token this step it detokenizes incrementally, looks for stop strings
across token boundaries, and builds the RequestOutput delta that the front end streams. It owns the
per-request text state; the scheduler owns everything else about a request.

A choice is `done` once the engine has returned its final RequestOutput: `process` only builds
outputs, and LLMEngine `commit`s them when the whole step has succeeded, so a step that fails
part-way leaves every choice it touched not done, to be ended by `end`. A group is forgotten
when all its choices are done.
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
    done: bool = False  # its final RequestOutput was returned by the engine


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}  # engine request id -> text state
        self._groups: dict[str, list[str]] = {}  # user request id -> its choices' engine ids

    def add(self, requests: list[Request]) -> None:
        """Register the choices of one user request (all share a group_id), in index order; all
        or nothing: every state is built before any is registered."""
        states = {
            req.request_id: _TextState(
                req,
                IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                       req.sampling_params.skip_special_tokens),
                StopStringMatcher(req.sampling_params.stop),
            )
            for req in requests
        }
        self._states.update(states)
        self._groups[requests[0].group_id] = list(states)

    def remove(self, group_id: str) -> None:
        """Forget a group and its choices' states, done or not."""
        for rid in self._groups.pop(group_id):
            del self._states[rid]

    def has_group(self, group_id: str) -> bool:
        return group_id in self._groups

    def unfinished_ids(self, group_id: str) -> list[str]:
        return [rid for rid in self._groups.get(group_id, []) if not self._states[rid].done]

    def process(
        self, updated: list[Request], runner_output: RunnerOutput
    ) -> tuple[list[RequestOutput], list[str]]:
        """Turn this step's new tokens into outputs.

        Returns the outputs and the ids of requests that a stop string just finished: the caller
        must finish those in the scheduler (their outputs already say finish_reason "stop"), then
        `commit` the outputs.
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

    def commit(self, outputs: list[RequestOutput]) -> None:
        """Mark the choices whose final output is in `outputs` done, once their step succeeded."""
        for out in outputs:
            if out.finished:
                self._done(self._states[self._groups[out.request_id][out.index]])

    def end(self, request_ids: list[str], finish_reason: str) -> list[RequestOutput]:
        """Final outputs for requests ended from outside, as `finish_reason` ("abort": the client
        left; "error": a step failed); their held-back text is dropped."""
        outputs = []
        for rid in request_ids:
            state = self._states.get(rid)
            if state is not None and not state.done:
                outputs.append(self._output(state, "", [], [], finish_reason, None))
                self._done(state)
        return outputs

    def check_integrity(self, unfinished: dict[str, Request]) -> None:
        """Assert that the choices not done are exactly `unfinished` (the scheduler's requests),
        and that every state belongs to the one group that lists it."""
        assert {rid: s.request for rid, s in self._states.items() if not s.done} == unfinished
        listed = [rid for ids in self._groups.values() for rid in ids]
        assert sorted(listed) == sorted(self._states)
        for group_id, ids in self._groups.items():
            assert [self._states[rid].request.index for rid in ids] == list(range(len(ids)))
            assert all(self._states[rid].request.group_id == group_id for rid in ids)
            assert not all(self._states[rid].done for rid in ids)

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
            return self._output(state, text, new_ids, logprob_list, "stop", matched)
        if req.is_finished:  # release text held back for a partial character or stop string
            text += state.stop_matcher.feed(state.detokenizer.flush())[0]
            text += state.stop_matcher.flush()
            return self._output(state, text, new_ids, logprob_list, req.finish_reason,
                                req.stop_reason)
        return self._output(state, text, new_ids, logprob_list, None, None)

    def _done(self, state: _TextState) -> None:
        state.done = True
        group_id = state.request.group_id
        if all(self._states[rid].done for rid in self._groups[group_id]):
            self.remove(group_id)

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
