"""Prefix-aware routing of engine requests across Ray Serve replicas.

Each engine replica has its own prefix cache, so a request whose prompt starts like one already
served is cheapest on the replica that served it: its shared blocks are prefilled once per
replica, not once per request. `PrefixIndex` remembers, per replica, the chained hashes of the
full prompt blocks routed to it (the engine's own `hash_block`, so a match here is a match in
that replica's cache unless it has evicted the block since); `rank_replicas` is the policy that
`ray_router.PrefixAwareRouter`, the Ray Serve request router, applies (kept here, free of Ray,
so that it is tested on its own):

- the replicas holding the longest prefix of the prompt (at least one block, and at least
  `MIN_MATCH_FRACTION` of its blocks) come first, unless they hold `imbalance` more ongoing
  requests than the least loaded candidate: a hot prefix must not pile every request onto one
  replica while others idle;
- otherwise the candidates rank by load (ongoing requests as Ray Serve last saw them), least
  loaded first, ties at random.

Ray Serve probes the chosen rank's queue lengths and takes a replica that accepts, so a full
replica is skipped whatever this ranking says.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from tokenmill.engine.block_manager import ROOT_HASH, hash_block

MAX_BLOCKS_PER_REPLICA = 100_000  # hashes remembered per replica, least recently routed dropped
# A prefix is followed only if it covers this much of the prompt: a chat template's common first
# block alone must not pin every request to one replica.
MIN_MATCH_FRACTION = 0.1


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the prompt's full blocks, as the engine's prefix cache keys them."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Which prompt blocks were routed to which replica (bounded, least recently used out)."""

    def __init__(self, max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA):
        self.max_blocks = max_blocks_per_replica
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}

    def add(self, replica: Hashable, hashes: list[int]) -> None:
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for h in reversed(hashes):  # parents used last, so evicted after their children: what
            blocks[h] = None  # is held stays closed under prefixes, as `match` assumes
            blocks.move_to_end(h)
        while len(blocks) > self.max_blocks:
            blocks.popitem(last=False)

    def match(self, replica: Hashable, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the replica holds (a chained hash present means
        its whole prefix is: blocks are only ever added with their parents)."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        lo, hi = 0, len(hashes)  # the longest matched prefix, by bisection over the chain
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in blocks:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def forget(self, replica: Hashable) -> None:
        self._blocks.pop(replica, None)


def rank_replicas(replicas: list[Hashable], matches: dict[Hashable, int],
                  loads: dict[Hashable, int], prompt_blocks: int, imbalance: int,
                  rng: random.Random = random) -> list[list[Hashable]]:
    """Ranks of replicas, most preferred first (see the module docstring). `matches`: blocks
    of the prompt each holds, of `prompt_blocks`; `loads`: ongoing requests (absent: unknown,
    taken as 0). Replicas of equal load are ranked at random, so that without a prefix to
    follow the load spreads evenly."""
    by_load = sorted(rng.sample(replicas, len(replicas)), key=lambda r: loads.get(r, 0))
    if not by_load:
        return []
    best = max(matches.get(r, 0) for r in replicas)
    if best > 0 and best >= MIN_MATCH_FRACTION * prompt_blocks:
        least = loads.get(by_load[0], 0)
        holders = [r for r in by_load if matches.get(r, 0) == best
                   and loads.get(r, 0) - least <= imbalance]
        if holders:
            return [holders, [r for r in by_load if r not in holders]]
    return [[r] for r in by_load]
