"""The values passed between engine stages, one step at a time:

    Scheduler.schedule() -> SchedulerOutput -> ModelRunner.execute() -> RunnerOutput
    -> Scheduler.update_from_output() -> OutputProcessor -> RequestOutput (to the front end)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # run tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so its logits are sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order: running decodes first, then prefill chunks
    num_batched_tokens: int  # sum of num_new_tokens, <= the token budget
    preempted: list[Request] = field(default_factory=list)  # sent back to waiting this step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    token_id: int  # the sampled token
    logprob: float  # its log-probability under the model's distribution
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), most likely first


@dataclass
class RunnerOutput:
    request_ids: list[str]  # the requests that sampled this step, in batch order
    sampled_token_ids: list[int]  # one per request_ids entry
    logprobs: list[TokenLogprobs | None]  # one per request_ids entry; None where not asked


@dataclass
class RequestOutput:
    request_id: str  # the user's request id (the group id when n > 1)
    index: int  # choice index
    new_token_ids: list[int]  # tokens generated since the previous output
    text: str  # text delta since the previous output (stop strings never appear)
    logprobs: list[TokenLogprobs]  # one per new token when logprobs were asked, else []
    finish_reason: str | None  # "stop", "length", "abort", "error" (a failed step) or None
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    num_output_tokens: int  # generated so far, in total

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
