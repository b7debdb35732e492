"""BlockManager on CPU: exact block ids, ref counts, prefix hits and eviction order.

block_size is 4 throughout; check_integrity() runs after every operation.
"""

from __future__ import annotations

import pytest

from tokenmill.engine.block_manager import NULL_BLOCK, ROOT_HASH, BlockManager, hash_block
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def compute(bm: BlockManager, r: Request, n: int) -> None:
    """What the scheduler does around a step: room for n tokens, then register and advance."""
    assert bm.allocate(r, n)
    bm.check_integrity()
    bm.cache_computed(r, n)
    r.num_computed_tokens += n
    bm.check_integrity()


def free(bm: BlockManager, r: Request) -> None:
    bm.free(r)
    bm.check_integrity()


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_count for b in bm.blocks]


def test_allocate_hands_out_blocks_in_order_and_grows_only_at_block_boundaries():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = req("a", range(10)), req("b", range(100, 105))
    compute(bm, a, 10)
    compute(bm, b, 5)
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3, 4])
    assert bm.usage == 5 / 8 and bm.num_free_blocks == 3
    a.output_token_ids += [1, 2]  # 12 tokens fill block 2: no new block
    compute(bm, a, 2)
    assert a.block_ids == [0, 1, 2]
    a.output_token_ids.append(3)  # the 13th token opens block 5
    compute(bm, a, 1)
    assert a.block_ids == [0, 1, 2, 5]
    assert refs(bm) == [1, 1, 1, 1, 1, 1, 0, 0]


def test_allocate_fails_without_side_effects():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a, b = req("a", range(12)), req("b", range(100, 108))
    compute(bm, a, 12)
    assert not bm.allocate(b, 8)  # 2 blocks needed, 1 free
    bm.check_integrity()
    assert b.block_ids == [] and bm.num_free_blocks == 1 and bm.usage == 3 / 4
    assert bm.allocate(b, 4)
    assert b.block_ids == [3]


def test_prefix_hit_shares_full_computed_blocks_with_ref_counts():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    compute(bm, a, 10)  # blocks 0 and 1 are full and cached; block 2 is partial
    assert [bm.blocks[i].block_hash is not None for i in range(3)] == [True, True, False]
    assert a.block_hashes == [hash_block(ROOT_HASH, [1, 2, 3, 4]),
                              hash_block(a.block_hashes[0], [5, 6, 7, 8])]
    b = req("b", [1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97])
    hits = bm.match_prefix(b)
    assert hits == [0, 1]
    assert bm.allocate(b, 3, hits)
    bm.check_integrity()
    assert b.block_ids == [0, 1, 3]
    assert refs(bm)[:4] == [2, 2, 1, 1]
    c = req("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])  # differs inside block 1: only block 0 hits
    assert bm.match_prefix(c) == [0]


def test_the_hit_never_covers_the_last_token():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = req("a", range(8))
    compute(bm, a, 8)
    assert [b.block_hash is not None for b in bm.blocks[:2]] == [True, True]
    assert bm.match_prefix(req("b", range(8))) == [0]  # the 8th token must be recomputed
    assert bm.match_prefix(req("c", range(9))) == [0, 1]


def test_the_same_block_at_another_position_does_not_hit():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    compute(bm, req("a", [9, 9, 9, 9, 1, 2, 3, 4, 0]), 9)
    assert bm.match_prefix(req("b", [1, 2, 3, 4, 5])) == []


def test_eviction_takes_free_blocks_first_then_least_recently_freed_tails_first():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = req("a", range(8)), req("b", range(50, 58))
    compute(bm, a, 8)
    compute(bm, b, 8)
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    free(bm, a)
    free(bm, b)
    assert list(bm.free_queue) == [4, 5, 6, 7, 1, 0, 3, 2]
    assert bm.usage == 0.0
    c = req("c", range(100, 120))
    compute(bm, c, 16)  # four never-used blocks: every cached prefix survives
    assert c.block_ids == [4, 5, 6, 7]
    assert bm.match_prefix(req("a2", range(9))) == [0, 1]
    c.output_token_ids.append(7)
    compute(bm, c, 1)  # evicts a's tail (freed first among the cached)
    assert c.block_ids == [4, 5, 6, 7, 1]
    assert bm.match_prefix(req("a2", range(9))) == [0]
    assert bm.match_prefix(req("b2", range(50, 59))) == [2, 3]


def test_blocks_without_a_hash_are_reused_before_cached_ones():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = req("a", range(6))
    compute(bm, a, 6)  # block 0 cached, block 1 partial
    x = req("x", range(20, 28))
    assert bm.allocate(x, 8)  # allocated, never computed: no hashes
    assert x.block_ids == [2, 3]
    free(bm, a)
    free(bm, x)
    assert list(bm.free_queue) == [2, 3, 1, 0]  # hash-less in front, then the cached block
    assert bm.match_prefix(req("a2", range(6))) == [0]


def test_a_hit_revives_a_cached_free_block_and_counts_it_when_checking_room():
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    a = req("a", range(8))
    compute(bm, a, 8)
    free(bm, a)
    assert list(bm.free_queue) == [2, 1, 0]
    b = req("b", range(16))  # hits blocks 0 and 1, then needs 2 more: only 1 is really free
    hits = bm.match_prefix(b)
    assert hits == [0, 1]
    assert not bm.allocate(b, 8, hits)
    bm.check_integrity()
    assert b.block_ids == [] and list(bm.free_queue) == [2, 1, 0]
    c = req("c", range(12))
    hits = bm.match_prefix(c)
    assert bm.allocate(c, 4, hits)
    bm.check_integrity()
    assert c.block_ids == [0, 1, 2] and refs(bm) == [1, 1, 1] and not bm.free_queue


def test_duplicate_content_is_cached_once():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = req("a", range(5)), req("b", range(5))
    assert bm.allocate(a, 5) and bm.allocate(b, 5)  # both admitted before either was computed
    for r in (a, b):
        bm.cache_computed(r, 5)
        r.num_computed_tokens = 5
    bm.check_integrity()
    assert bm.cached == {a.block_hashes[0]: 0} and a.block_hashes == b.block_hashes
    assert bm.blocks[2].block_hash is None  # b's copy: reusable at once when freed
    free(bm, b)
    assert list(bm.free_queue)[:2] == [2, 3]


def test_free_releases_shared_blocks_only_when_the_last_holder_goes():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = req("a", range(9))
    compute(bm, a, 9)
    b = req("b", range(10))
    assert bm.allocate(b, 2, bm.match_prefix(b))
    bm.check_integrity()
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [0, 1, 3])
    free(bm, a)
    assert refs(bm)[:4] == [1, 1, 0, 1] and list(bm.free_queue) == [2, 4, 5, 6, 7]
    free(bm, b)
    assert refs(bm) == [0] * 8 and bm.usage == 0.0
    assert list(bm.free_queue) == [3, 2, 4, 5, 6, 7, 1, 0]


def test_reset_prefix_cache_and_disabled_caching():
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = req("a", range(9))
    compute(bm, a, 9)
    bm.reset_prefix_cache()
    bm.check_integrity()
    assert bm.cached == {} and bm.match_prefix(req("b", range(9))) == []
    off = BlockManager(8, BS, enable_prefix_caching=False)
    c = req("c", range(9))
    compute(off, c, 9)
    assert off.match_prefix(req("d", range(9))) == [] and off.cached == {} and c.block_hashes == []


def test_check_integrity_catches_a_lost_reference():
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = req("a", range(5))
    compute(bm, a, 5)
    a.block_ids.pop()  # the request forgot a block it still holds a reference to
    with pytest.raises(AssertionError):
        bm.check_integrity()


N = NULL_BLOCK


def decode(bm: BlockManager, r: Request, token: int) -> None:
    r.output_token_ids.append(token)
    compute(bm, r, 1)


def test_blocks_out_of_the_window_go_back_to_the_free_queue_and_stay_cached():
    bm = BlockManager(8, BS, enable_prefix_caching=True, sliding_window=6)
    a = req("a", range(10))
    compute(bm, a, 10)
    assert a.block_ids == [0, 1, 2] and list(bm.free_queue) == [3, 4, 5, 6, 7]
    decode(bm, a, 10)  # the query at 10 sees 5..10: block 0 (0..3) is out, cached, at the back
    assert a.block_ids == [N, 1, 2] and list(bm.free_queue) == [3, 4, 5, 6, 7, 0]
    decode(bm, a, 11)
    decode(bm, a, 12)  # position 12 opens block 3
    assert a.block_ids == [N, 1, 2, 3] and list(bm.free_queue) == [4, 5, 6, 7, 0]
    decode(bm, a, 13)  # the query at 13 sees 8..13: block 1 is out
    assert a.block_ids == [N, N, 2, 3] and list(bm.free_queue) == [4, 5, 6, 7, 0, 1]
    assert refs(bm) == [0, 0, 1, 1, 0, 0, 0, 0] and bm.usage == 2 / 8
    assert sorted(bm.cached.values()) == [0, 1, 2]
    free(bm, a)  # only real blocks: the partial tail in front, block 2 cached at the back
    assert list(bm.free_queue) == [3, 4, 5, 6, 7, 0, 1, 2] and bm.usage == 0.0


def test_a_prefix_hit_takes_only_the_hit_blocks_inside_the_window():
    bm = BlockManager(8, BS, enable_prefix_caching=True, sliding_window=6)
    a = req("a", range(14))
    compute(bm, a, 14)
    free(bm, a)
    assert list(bm.free_queue) == [3, 4, 5, 6, 7, 2, 1, 0]
    b = req("b", range(15))
    hits = bm.match_prefix(b)
    assert hits == [0, 1, 2]  # a contiguous chain of real cached blocks from the first
    assert bm.allocate(b, 3, hits)  # the query at 12 sees 7..12: block 0 is never read
    b.num_computed_tokens = 12  # as the scheduler does after a hit
    bm.check_integrity()
    assert b.block_ids == [N, 1, 2, 3] and refs(bm)[:4] == [0, 1, 1, 1]
    assert list(bm.free_queue) == [4, 5, 6, 7, 0] and bm.blocks[0].block_hash is not None
    c = req("c", range(9))
    assert bm.match_prefix(c) == [0, 1]  # block 0 still serves a hit, now sharing block 1
    assert bm.allocate(c, 1, [0, 1])
    c.num_computed_tokens = 8
    bm.check_integrity()
    assert c.block_ids == [0, 1, 4] and refs(bm)[:5] == [1, 2, 1, 1, 1]


def test_a_long_request_cycles_through_its_window_of_blocks():
    # Window 4: a decode needs the block before it and its own, so two blocks serve any length.
    bm = BlockManager(2, BS, enable_prefix_caching=False, sliding_window=4)
    a = req("a", range(4))
    compute(bm, a, 4)
    history = []
    for token in range(4, 24):
        decode(bm, a, token)
        history.append(list(a.block_ids))
    assert history[0] == [0, 1]  # position 4 opens block 1
    assert history[4] == [N, 1, 0]  # position 8: block 0 (0..3) released, reused at once
    assert history[8] == [N, N, 0, 1]
    assert history[-2] == [N, N, N, N, 0, 1]
    assert history[-1] == [N, N, N, N, N, 1]  # the query at 23 sees 20..23: block 1 alone
    assert a.num_computed_tokens == 24 and list(bm.free_queue) == [0]


def test_check_integrity_catches_a_released_block_inside_the_window():
    bm = BlockManager(8, BS, enable_prefix_caching=True, sliding_window=6)
    a = req("a", range(10))
    compute(bm, a, 10)
    decode(bm, a, 10)
    assert a.block_ids == [N, 1, 2]
    a.num_computed_tokens = 8  # a query at 8 would read position 3, in the released block 0
    with pytest.raises(AssertionError):
        bm.check_integrity()
