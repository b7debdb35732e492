"""Request: the engine-owned, mutable state of one sequence being generated.

Only the scheduler (and the block manager it owns) mutate a Request; the runner reads it to build
tensors. There is no prefill/decode flag: a request is prefilling while
`num_computed_tokens < len(prompt_token_ids)`, and every step simply brings
`num_computed_tokens` closer to `num_tokens`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.engine.structured import Grammar
from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Anything after PREEMPTED is finished.
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the context length
    FINISHED_ABORTED = 5  # the client went away or the server gave up
    FINISHED_ERROR = 6  # a step that ran it (or a sibling choice) failed

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


def choice_id(group_id: str, index: int) -> str:
    """The engine id of choice `index` of the user request `group_id`. Injective: the last '#'
    is always the one added here (a decimal index has none), so no caller-chosen group id can
    produce another request's choice id."""
    return f"{group_id}#{index}"


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice `index` of a request seeded with `seed`: choice 0 uses the
    seed itself, choice i > 0 the state of the i-th child of numpy's SeedSequence(seed), so the
    choices draw independent streams and no choice replays another seed's choice 0."""
    if index == 0:
        return seed
    entropy = seed % (1 << 64)  # SeedSequence takes non-negative entropy; a bijection on int64
    return int(np.random.SeedSequence(entropy, spawn_key=(index,)).generate_state(1, np.uint64)[0])


@dataclass(eq=False)
class Request:
    request_id: str  # unique inside the engine: LLMEngine names every choice choice_id(group, i)
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    group_id: str | None = None  # the user's request id (LLMEngine sets it); None: request_id
    index: int = 0  # choice index inside its group
    prefix_source: Request | None = None  # a sibling whose prompt blocks this one should reuse
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache (-1: not scheduled yet)
    block_ids: list[int] = field(default_factory=list)  # KV blocks, in token order
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks
    stop_reason: int | str | None = None  # the token id or stop string that ended it
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # seeded per request; None when seed is None
    grammar: Grammar | None = None  # sampling_params.structured's state; has consumed the outputs

    def __post_init__(self) -> None:
        if self.group_id is None:
            self.group_id = self.request_id
        seed = self.sampling_params.seed
        if seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(choice_seed(seed, self.index))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
