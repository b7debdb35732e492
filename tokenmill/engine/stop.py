"""Token-level stop decision, taken by the scheduler right after a sampled token is appended.

Stop strings need text, so the engine's output processor decides them and calls
`Scheduler.finish_requests`. A stopping token stays in `output_token_ids` (it was generated and
is billed); the output processor keeps it out of the text.
"""

from __future__ import annotations

from tokenmill.engine.request import Request, RequestStatus


def check_stop(request: Request, eos_token_ids: frozenset[int],
               max_model_len: int) -> RequestStatus | None:
    """Why the request ends with its newest token, or None. First match wins, in this order:

    a stop token id, EOS (unless ignore_eos), a grammar that is complete (it consumed EOS, even
    with ignore_eos: nothing may follow) or broken, max_tokens, the context length. Stop and EOS
    ids count only once min_tokens tokens came before them (the sampler masks them until then,
    unless a complete grammar allows nothing else).
    """
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    num_output = len(request.output_token_ids)
    if num_output > params.min_tokens:
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
    if request.grammar is not None and request.grammar.is_terminated:
        return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and num_output >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
