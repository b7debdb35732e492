"""Scheduler on CPU with a fake model: exact batches, block ids, prefix hits, preemption, stops.

The fake model keeps a KV cache of token ids: it writes each scheduled token into its slot, reads
back through the request's block ids every position the step's queries attend to (the whole
context, or under a sliding window W the positions from the first query's window on), checks they
equal the request's tokens, and a sampling row returns sum(last query's context) % 97. So a wrong
block table, a bad prefix hit, a block released while still in the window or a resume that skips
a token changes the output, and outputs must equal those of a run with a cache large enough that
nothing is ever preempted.
"""

from __future__ import annotations

import random

import pytest

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.block_manager import NULL_BLOCK
from tokenmill.engine.outputs import RunnerOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.stop import check_stop
from tokenmill.sampling_params import SamplingParams

EOS = 96  # the fake model emits 0..96; most tests give it an EOS it never reaches
NEVER = 1000


def make(num_blocks=64, block_size=16, budget=64, max_seqs=8, max_model_len=1024,
         prefix=True, eos=(NEVER,), window=None) -> Scheduler:
    return Scheduler(SchedulerConfig(budget, max_seqs, max_model_len),
                     CacheConfig(block_size, num_blocks, enable_prefix_caching=prefix,
                                 sliding_window=window), eos)


def req(rid, prompt, max_tokens=16, **params) -> Request:
    return Request(rid, list(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                     **params))


class FakeModel:
    def __init__(self, sched: Scheduler):
        self.block_size = sched.block_manager.block_size
        self.window = sched.block_manager.sliding_window
        self.kv = [None] * (sched.block_manager.num_blocks * self.block_size)
        self.rows_with_released_blocks = 0  # rows whose block table held a NULL_BLOCK

    def slot(self, r: Request, pos: int) -> int:
        block = r.block_ids[pos // self.block_size]
        assert block != NULL_BLOCK, (r.request_id, pos)
        return block * self.block_size + pos % self.block_size

    def execute(self, out) -> RunnerOutput:
        ids, tokens = [], []
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            end = start + s.num_new_tokens
            self.rows_with_released_blocks += NULL_BLOCK in r.block_ids
            for pos in range(start, end):
                self.kv[self.slot(r, pos)] = r.all_token_ids[pos]
            first = 0 if self.window is None else max(0, start - self.window + 1)
            context = [self.kv[self.slot(r, pos)] for pos in range(first, end)]
            assert context == r.all_token_ids[first:end], r.request_id
            if s.samples:
                ids.append(r.request_id)
                seen = context if self.window is None else context[-self.window:]
                tokens.append(sum(seen) % 97)  # what the last query attends to
        return RunnerOutput(ids, tokens, [None] * len(ids))


def step(sched: Scheduler, model: FakeModel):
    """One engine step; returns the SchedulerOutput and the updated requests."""
    out = sched.schedule()
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
    assert sched.num_running <= sched.config.max_num_seqs
    updated = sched.update_from_output(out, model.execute(out))
    sched.check_integrity()
    return out, updated


def batch(out) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def run(sched: Scheduler, requests, late=None, model=None) -> dict[str, list[int]]:
    """Step until done (`late[k]` joins before step k); returns each request's output tokens."""
    model, late = model or FakeModel(sched), late or {}
    everyone = list(requests) + [r for rs in late.values() for r in rs]
    for r in requests:
        sched.add_request(r)
    k = 0
    while sched.has_unfinished_requests() or k <= max(late, default=-1):
        for r in late.get(k, []):
            sched.add_request(r)
        step(sched, model)
        k += 1
    assert sched.kv_cache_usage == 0.0 and sched.num_running == sched.num_waiting == 0
    return {r.request_id: r.output_token_ids for r in everyone}


def reference(requests, window=None) -> dict[str, list[int]]:
    """Outputs of fresh copies run alone in a roomy cache."""
    return {r.request_id: run(make(num_blocks=256, block_size=4, window=window),
                              [req(r.request_id, r.prompt_token_ids,
                                   r.sampling_params.max_tokens)])[r.request_id]
            for r in requests}


def test_budget_chunks_long_prompts_and_mixes_them_with_decodes():
    sched = make(budget=32)
    model = FakeModel(sched)
    a, b, c = req("a", range(10)), req("b", range(100, 140)), req("c", range(200, 300))
    sched.add_request(a)
    sched.add_request(b)
    out, updated = step(sched, model)
    assert batch(out) == [("a", 10), ("b", 22)] and out.num_batched_tokens == 32
    assert (a.block_ids, b.block_ids) == ([0], [1, 2])
    assert updated == [a] and b.output_token_ids == [] and b.num_computed_tokens == 22
    out, updated = step(sched, model)
    assert batch(out) == [("a", 1), ("b", 18)] and b.block_ids == [1, 2, 3]
    assert updated == [a, b]
    sched.add_request(c)
    steps = [batch(step(sched, model)[0]) for _ in range(4)]
    assert steps == [[("a", 1), ("b", 1), ("c", 30)], [("a", 1), ("b", 1), ("c", 30)],
                     [("a", 1), ("b", 1), ("c", 30)], [("a", 1), ("b", 1), ("c", 10)]]
    assert c.block_ids == [4, 5, 6, 7, 8, 9, 10] and len(c.output_token_ids) == 1


def test_rows_of_one_token_come_first_in_the_batch():
    sched = make(budget=8)
    sched.add_request(req("a", range(7)))
    sched.add_request(req("b", range(20)))
    out, _ = step(sched, FakeModel(sched))
    assert batch(out) == [("b", 1), ("a", 7)]  # b got the last token of the budget


def test_repeated_system_prompt_is_computed_once():
    sched = make(block_size=16)
    model = FakeModel(sched)
    system = list(range(1, 33))  # two full blocks
    a, b = req("a", system + [50, 51, 52]), req("b", system + [60, 61, 62, 63, 64])
    sched.add_request(a)
    step(sched, model)
    sched.add_request(b)
    out, _ = step(sched, model)
    assert batch(out) == [("a", 1), ("b", 5)]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 32)
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [0, 1, 3])
    assert [blk.ref_count for blk in sched.block_manager.blocks[:4]] == [2, 2, 1, 1]


def test_a_prompt_fully_in_the_cache_still_recomputes_its_last_block():
    sched = make(block_size=16)
    model = FakeModel(sched)
    prompt = list(range(32))
    a, b = req("a", prompt), req("b", prompt)
    sched.add_request(a)
    step(sched, model)
    sched.add_request(b)
    out, _ = step(sched, model)
    assert batch(out) == [("a", 1), ("b", 16)] and b.num_cached_tokens == 16
    assert b.output_token_ids == a.output_token_ids[:1]


def test_preemption_frees_the_newest_and_resume_gives_the_same_output():
    sched = make(num_blocks=5, block_size=4)
    model = FakeModel(sched)
    a, b = req("a", range(1, 7), max_tokens=8), req("b", range(11, 17), max_tokens=8)
    expected = reference([a, b])
    sched.add_request(a)
    sched.add_request(b)
    outs = [step(sched, model)[0] for _ in range(4)]
    assert [batch(o) for o in outs[:3]] == [[("a", 6), ("b", 6)]] + [[("a", 1), ("b", 1)]] * 2
    assert batch(outs[3]) == [("a", 1)] and outs[3].preempted == [b]
    assert a.block_ids == [0, 1, 4] and list(sched.block_manager.free_queue) == [3, 2]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert list(sched.waiting) == [b] and b.output_token_ids == expected["b"][:3]
    for _ in range(4):  # b cannot fit until a finishes (a takes b's cached tail block on the way)
        out, _ = step(sched, model)
        assert batch(out) == [("a", 1)]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == expected["a"]
    out, _ = step(sched, model)  # b resumes: its first block is still cached
    assert batch(out) == [("b", 5)] and b.block_ids == [2, 3, 4] and b.num_cached_tokens == 0
    while sched.has_unfinished_requests():
        step(sched, model)
    assert b.output_token_ids == expected["b"] and sched.kv_cache_usage == 0.0


def test_the_request_that_needs_a_block_preempts_the_newest_not_itself():
    sched = make(num_blocks=6, block_size=4)
    model = FakeModel(sched)
    rs = [req(n, range(10 * i, 10 * i + 4), max_tokens=8) for i, n in enumerate("abc")]
    expected = reference(rs)
    for r in rs:
        sched.add_request(r)
    for _ in range(5):
        step(sched, model)
    out, _ = step(sched, model)
    assert out.preempted == [rs[2]] and batch(out) == [("a", 1), ("b", 1)]
    assert (rs[0].block_ids, rs[1].block_ids) == ([0, 3, 5], [1, 4, 2])
    while sched.has_unfinished_requests():
        step(sched, model)
    assert {r.request_id: r.output_token_ids for r in rs} == expected
    assert [r.num_preemptions for r in rs] == [0, 0, 1]


def test_a_step_that_preempted_admits_nobody():
    sched = make(num_blocks=3, block_size=4, budget=4, prefix=False)
    model = FakeModel(sched)
    a, c = req("a", range(3)), req("c", range(10, 15))
    sched.add_request(a)
    sched.add_request(c)
    assert batch(step(sched, model)[0]) == [("c", 1), ("a", 3)]
    assert batch(step(sched, model)[0]) == [("a", 1), ("c", 3)]
    out, _ = step(sched, model)
    # c's first chunk of 3 would fit in the blocks it just lost: it must wait a step anyway.
    assert batch(out) == [("a", 1)] and out.preempted == [c] and list(sched.waiting) == [c]
    assert batch(step(sched, model)[0]) == [("a", 1), ("c", 3)]


def _waiting(sched, model):
    sched.add_request(victim := req("v", range(20)))
    return victim, None


def _mid_prefill(sched, model):
    victim, other = req("v", range(20)), req("o", range(30, 35))
    sched.add_request(victim)
    sched.add_request(other)
    step(sched, model)
    assert 0 < victim.num_computed_tokens < victim.num_prompt_tokens
    return victim, other


def _running(sched, model):
    victim, other = _mid_prefill(sched, model)
    step(sched, model)
    step(sched, model)
    assert victim.output_token_ids and victim.status == RequestStatus.RUNNING
    return victim, other


def _preempted(sched, model):
    other, victim = req("o", range(1, 7), max_tokens=8), req("v", range(11, 17), max_tokens=8)
    sched.add_request(other)
    sched.add_request(victim)
    for _ in range(4):
        step(sched, model)
    assert victim.status == RequestStatus.PREEMPTED
    return victim, other


MOMENTS = {  # moment -> (scheduler options, brings "v" there; returns (v, a bystander or None))
    "waiting": ({}, _waiting),
    "mid-prefill": ({"budget": 8}, _mid_prefill),
    "running": ({"budget": 8}, _running),
    "preempted": ({"num_blocks": 5, "block_size": 4}, _preempted),
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_abort_at_any_moment_frees_everything(moment):
    options, bring = MOMENTS[moment]
    sched = make(**options)
    model = FakeModel(sched)
    victim, other = bring(sched, model)
    sched.finish_requests(["v", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    assert victim.status == RequestStatus.FINISHED_ABORTED and victim.block_ids == []
    assert victim not in sched.running and victim not in sched.waiting
    sched.finish_requests("v", RequestStatus.FINISHED_ABORTED)  # twice is harmless
    while sched.has_unfinished_requests():
        step(sched, model)
    assert sched.kv_cache_usage == 0.0 and sched.num_running == sched.num_waiting == 0
    assert other is None or other.status == RequestStatus.FINISHED_LENGTH


def test_abort_between_schedule_and_update_is_skipped():
    sched = make()
    model = FakeModel(sched)
    a, b = req("a", range(5)), req("b", range(10, 15))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    runner_out = model.execute(out)
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, runner_out) == [b]
    sched.check_integrity()
    assert a.output_token_ids == [] and len(b.output_token_ids) == 1


def test_n_siblings_wait_for_the_prompt_and_share_its_blocks():
    sched = make(block_size=16)
    model = FakeModel(sched)
    prompt = list(range(40))
    params = SamplingParams(temperature=0.0, max_tokens=4, n=3)
    src = Request("g-0", list(prompt), params, group_id="g")
    sibs = [Request(f"g-{i}", list(prompt), params, group_id="g", index=i, prefix_source=src)
            for i in (1, 2)]
    other = req("c", range(100, 110), max_tokens=4)
    for r in [src, *sibs, other]:
        sched.add_request(r)
    out, _ = step(sched, model)
    assert batch(out) == [("g-0", 40), ("c", 10)] and list(sched.waiting) == sibs
    out, _ = step(sched, model)
    assert batch(out) == [("g-0", 1), ("c", 1), ("g-1", 8), ("g-2", 8)]
    assert [r.block_ids for r in [src, *sibs]] == [[0, 1, 2], [0, 1, 4], [0, 1, 5]]
    assert [blk.ref_count for blk in sched.block_manager.blocks[:3]] == [3, 3, 1]
    assert [r.num_cached_tokens for r in [src, *sibs]] == [0, 32, 32]
    while sched.has_unfinished_requests():
        step(sched, model)
    assert src.output_token_ids == sibs[0].output_token_ids == sibs[1].output_token_ids


def test_siblings_do_not_wait_without_prefix_caching_or_for_a_finished_source():
    sched = make(prefix=False)
    src = req("g-0", range(40))
    sib = Request("g-1", list(range(40)), src.sampling_params, index=1, prefix_source=src)
    sched.add_request(src)
    sched.add_request(sib)
    assert batch(sched.schedule()) == [("g-0", 40), ("g-1", 24)]
    sched = make()
    src = req("g-0", range(40))
    sib = Request("g-1", list(range(40)), src.sampling_params, index=1, prefix_source=src)
    sched.add_request(src)
    sched.add_request(sib)
    sched.finish_requests(["g-0"], RequestStatus.FINISHED_ABORTED)
    assert batch(sched.schedule()) == [("g-1", 40)]


def test_admission_is_fcfs_a_small_request_never_overtakes_a_blocked_one():
    sched = make(num_blocks=4, block_size=4)
    model = FakeModel(sched)
    x, y, z = req("x", range(12), max_tokens=2), req("y", range(20, 28)), req("z", [1, 2])
    for r in (x, y, z):
        sched.add_request(r)
    out, _ = step(sched, model)
    assert batch(out) == [("x", 12)] and list(sched.waiting) == [y, z]  # z would have fitted
    out, _ = step(sched, model)
    assert batch(out) == [("x", 1)] and x.status == RequestStatus.FINISHED_LENGTH
    out, _ = step(sched, model)
    assert batch(out) == [("y", 8), ("z", 2)]
    assert (y.block_ids, z.block_ids) == ([3, 2], [1])  # x's partial block first, then its tail


def test_max_num_seqs_caps_the_running_set():
    sched = make(max_seqs=2)
    model = FakeModel(sched)
    rs = [req(n, range(4), max_tokens=2) for n in "abc"]
    for r in rs:
        sched.add_request(r)
    out, _ = step(sched, model)
    assert batch(out) == [("a", 4), ("b", 4)] and (sched.num_running, sched.num_waiting) == (2, 1)
    out, updated = step(sched, model)
    assert batch(out) == [("a", 1), ("b", 1)] and all(r.is_finished for r in updated)
    out, _ = step(sched, model)
    assert batch(out) == [("c", 4)] and rs[2].num_cached_tokens == 0  # all 4 tokens must run
    assert rs[2].status == RequestStatus.RUNNING


@pytest.mark.parametrize("params, outputs, expected", [
    ({"stop_token_ids": (5,)}, [5], RequestStatus.FINISHED_STOPPED),
    ({}, [EOS], RequestStatus.FINISHED_STOPPED),
    ({"ignore_eos": True}, [EOS], None),
    ({"ignore_eos": True, "stop_token_ids": (EOS,)}, [EOS], RequestStatus.FINISHED_STOPPED),
    ({"min_tokens": 2}, [1, EOS], None),
    ({"min_tokens": 2, "stop_token_ids": (5,)}, [1, 5], None),
    ({"min_tokens": 2}, [1, 1, EOS], RequestStatus.FINISHED_STOPPED),
    ({"max_tokens": 3}, [1, 1, 1], RequestStatus.FINISHED_LENGTH),
    ({"max_tokens": 3, "stop_token_ids": (5,)}, [1, 1, 5], RequestStatus.FINISHED_STOPPED),
    ({"max_tokens": 3}, [1, 1, EOS], RequestStatus.FINISHED_STOPPED),
    ({"max_tokens": None}, [1, 1, 1, 1], RequestStatus.FINISHED_LENGTH),  # 4 + 4 = max_model_len
    ({"max_tokens": None}, [1, 1, 1], None),
])
def test_check_stop_order(params, outputs, expected):
    r = Request("r", [1, 2, 3, 4], SamplingParams(**{"max_tokens": 16, **params}))
    r.output_token_ids = outputs
    assert check_stop(r, frozenset({EOS}), max_model_len=8) == expected


def test_stops_through_the_scheduler_set_reason_and_free():
    sched = make(eos=(EOS,), max_model_len=12)
    model = FakeModel(sched)
    # sum(range(10)) = 45, then 90, then 180 % 97 = 83: a stop id on the 2nd token
    a = req("a", range(10), stop_token_ids=(90,))
    b = req("b", [EOS + 1, 0, 0, 0, 0, 0, 0, 0])  # 97 % 97 = 0, then 0, ... never EOS
    c = req("c", [EOS], max_tokens=None, ignore_eos=True)  # samples EOS first, goes on
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, model)
    out, updated = step(sched, model)
    assert a in updated and (a.status, a.stop_reason) == (RequestStatus.FINISHED_STOPPED, 90)
    assert a.output_token_ids == [45, 90] and a.block_ids == [] and a not in sched.running
    while sched.has_unfinished_requests():
        step(sched, model)
    assert (b.status, b.stop_reason, b.num_tokens) == (RequestStatus.FINISHED_LENGTH, None, 12)
    assert (c.status, c.output_token_ids[0], c.num_tokens) == (RequestStatus.FINISHED_LENGTH,
                                                               EOS, 12)


def test_add_request_rejects_what_could_never_run():
    sched = make(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(req("a", range(32)))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add_request(req("b", range(16)))  # 4 blocks hold 16 tokens: no room for output
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(req("c", []))
    sched.add_request(req("d", range(15)))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(req("d", range(3)))
    assert sched.num_waiting == 1


def test_random_traffic_with_a_small_cache_matches_the_roomy_reference():
    rng = random.Random(0)
    system = [rng.randrange(97) for _ in range(12)]
    late, everyone = {}, []
    for i in range(24):
        prompt = (system if i % 2 else []) + [rng.randrange(97) for _ in range(rng.randint(1, 14))]
        r = req(f"r{i}", prompt, max_tokens=rng.randint(1, 20))
        late.setdefault(rng.randrange(30), []).append(r)
        everyone.append(r)
    expected = reference(everyone)
    sched = make(num_blocks=14, block_size=4, budget=24, max_seqs=6, max_model_len=48)
    assert run(sched, [], late) == expected
    assert sum(r.num_preemptions for r in everyone) > 0
    assert sum(r.num_cached_tokens > 0 for r in everyone) > 0


N = NULL_BLOCK


def test_a_window_releases_blocks_each_step_and_keeps_the_outputs():
    sched = make(num_blocks=8, block_size=4, budget=4, window=6)
    model = FakeModel(sched)
    a = req("a", range(10), max_tokens=8)
    expected = reference([a], window=6)
    sched.add_request(a)
    traces = [(batch(step(sched, model)[0]), list(a.block_ids)) for _ in range(4)]
    assert traces == [([("a", 4)], [0]), ([("a", 4)], [0, 1]), ([("a", 2)], [0, 1, 2]),
                      ([("a", 1)], [N, 1, 2])]  # the query at 10 sees 5..10: block 0 is out
    assert list(sched.block_manager.free_queue) == [3, 4, 5, 6, 7, 0]  # cached, at the back
    assert sched.kv_cache_usage == 2 / 8
    run(sched, [], model=model)  # to the end
    assert a.output_token_ids == expected["a"]
    assert expected["a"] != reference([a])["a"]  # the window changes what the fake computes


def test_abort_of_a_windowed_request_frees_only_its_real_blocks():
    sched = make(num_blocks=8, block_size=4, budget=4, window=6)
    model = FakeModel(sched)
    sched.add_request(a := req("a", range(10), max_tokens=8))
    for _ in range(4):
        step(sched, model)
    assert a.block_ids == [N, 1, 2]
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    sched.check_integrity()
    assert list(sched.block_manager.free_queue) == [2, 3, 4, 5, 6, 7, 0, 1]
    assert a.block_ids == [] and sched.kv_cache_usage == 0.0


def test_a_windowed_prompt_hits_blocks_that_left_the_window():
    sched = make(num_blocks=16, block_size=4, window=6)
    model = FakeModel(sched)
    a = req("a", range(20), max_tokens=4)
    b = req("b", [*range(20), 50, 51], max_tokens=4)
    expected = reference([a, b], window=6)
    sched.add_request(a)
    step(sched, model)
    assert a.block_ids == [0, 1, 2, 3, 4]
    sched.add_request(b)
    out, _ = step(sched, model)  # a's decode at 20 sees 15..20: blocks 0-2 released, cached
    assert batch(out) == [("a", 1), ("b", 2)] and b.num_cached_tokens == 20
    assert a.block_ids == [N, N, N, 3, 4, 5] and b.block_ids == [N, N, N, 3, 4, 6]
    bm = sched.block_manager
    assert [blk.ref_count for blk in bm.blocks[:7]] == [0, 0, 0, 2, 2, 1, 1]
    assert all(bm.blocks[i].block_hash is not None for i in range(5))
    assert list(bm.free_queue)[-3:] == [2, 1, 0]
    run(sched, [], model=model)
    assert {r.request_id: r.output_token_ids for r in (a, b)} == expected


def test_a_windowed_request_may_outgrow_the_cache():
    # Window 6, chunks of 4, blocks of 4: a request never holds more than 3 blocks at once.
    with pytest.raises(ValueError, match="KV cache"):
        make(num_blocks=4, block_size=4, budget=4, max_model_len=64).add_request(
            req("a", range(30)))
    assert make(num_blocks=2, block_size=4, budget=4, max_model_len=64,
                window=6).max_model_len == 8  # 2 blocks cannot hold a window: capped as before
    sched = make(num_blocks=4, block_size=4, budget=4, max_model_len=64, window=6)
    assert sched.max_model_len == 64
    a = req("a", range(30), max_tokens=20)  # 50 tokens through a cache of 16
    expected = reference([a], window=6)
    sched.add_request(a)
    model, most_held = FakeModel(sched), 0
    while sched.has_unfinished_requests():
        step(sched, model)
        most_held = max(most_held, sum(b != NULL_BLOCK for b in a.block_ids))
    assert a.output_token_ids == expected["a"] and most_held == 3
    assert a.num_preemptions == 0 and sched.kv_cache_usage == 0.0


def test_random_windowed_traffic_with_a_small_cache_matches_the_roomy_reference():
    rng = random.Random(1)
    system = [rng.randrange(97) for _ in range(12)]
    late, everyone = {}, []
    for i in range(24):
        prompt = (system if i % 2 else []) + [rng.randrange(97) for _ in range(rng.randint(1, 20))]
        r = req(f"r{i}", prompt, max_tokens=rng.randint(1, 24))
        late.setdefault(rng.randrange(30), []).append(r)
        everyone.append(r)
    expected = reference(everyone, window=6)
    sched = make(num_blocks=10, block_size=4, budget=8, max_seqs=6, max_model_len=64, window=6)
    model = FakeModel(sched)
    assert run(sched, [], late, model) == expected
    assert sum(r.num_preemptions for r in everyone) > 0
    assert sum(r.num_cached_tokens > 0 for r in everyone) > 0
    assert model.rows_with_released_blocks > 0
