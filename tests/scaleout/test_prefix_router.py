"""The prefix-aware routing policy on its own (tokenmill/scaleout/prefix_router.py): the prompt's
block hashes are the engine prefix cache's, the index finds the longest held prefix, and the
ranking prefers its holders within the load and match bounds."""

import random

from tokenmill.engine.block_manager import ROOT_HASH, hash_block
from tokenmill.scaleout.prefix_router import (MIN_MATCH_FRACTION, PrefixIndex,
                                              prompt_block_hashes, rank_replicas)


def test_prompt_block_hashes_chain_the_full_blocks_as_the_engine_does():
    ids = list(range(100, 140))  # 2 full blocks of 16 and 8 tokens left over
    first = hash_block(ROOT_HASH, ids[:16])
    assert prompt_block_hashes(ids, 16) == [first, hash_block(first, ids[16:32])]
    assert prompt_block_hashes(ids[:15], 16) == []


def test_the_index_finds_the_longest_prefix_each_replica_holds():
    a = prompt_block_hashes(list(range(64)), 16)  # 4 blocks
    b = prompt_block_hashes(list(range(32)) + [7] * 32, 16)  # shares a's first 2 blocks
    index = PrefixIndex()
    index.add("r1", a)
    index.add("r2", b[:3])
    assert [index.match("r1", h) for h in (a, b)] == [4, 2]
    assert [index.match("r2", h) for h in (a, b)] == [2, 3]
    assert index.match("r3", a) == 0 and index.match("r1", []) == 0
    index.forget("r1")
    assert index.match("r1", a) == 0


def test_the_index_forgets_the_least_recently_routed_blocks_deepest_first():
    index = PrefixIndex(max_blocks_per_replica=4)
    old, new = prompt_block_hashes(list(range(48)), 16), prompt_block_hashes([5] * 32, 16)
    index.add("r", old)  # 3 blocks
    index.add("r", new)  # 2 more: old's deepest block goes first, its parents stay
    assert index.match("r", new) == 2 and index.match("r", old) == 2
    index.add("r", prompt_block_hashes([9] * 48, 16))  # 3 more: old's two blocks and new's last go
    assert index.match("r", old) == 0 and index.match("r", new) == 1


def test_the_holder_of_the_longest_prefix_comes_first_while_the_load_allows():
    ranks = rank_replicas(["a", "b", "c"], {"a": 1, "b": 6}, {"a": 0, "b": 3, "c": 0}, 10, 4)
    assert ranks[0] == ["b"] and sorted(ranks[1]) == ["a", "c"]
    # b is now 5 requests above the least loaded: load wins, least loaded first
    ranks = rank_replicas(["a", "b", "c"], {"a": 1, "b": 6}, {"a": 0, "b": 5, "c": 1}, 10, 4)
    assert ranks == [["a"], ["c"], ["b"]]


def test_a_match_below_the_minimum_fraction_is_not_followed():
    blocks = 100
    small = int(MIN_MATCH_FRACTION * blocks) - 1
    ranks = rank_replicas(["a", "b"], {"b": small}, {"a": 0, "b": 2}, blocks, 4)
    assert ranks == [["a"], ["b"]]


def test_equal_loads_without_a_prefix_rank_at_random():
    firsts = {rank_replicas(["a", "b"], {}, {}, 3, 4, random.Random(seed))[0][0]
              for seed in range(20)}
    assert firsts == {"a", "b"}
    assert rank_replicas([], {}, {}, 3, 4) == []
