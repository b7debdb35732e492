"""BlockManager: the one owner of the KV cache's blocks, with ref counts and a prefix cache.

The scheduler asks it for room (`match_prefix`, then `allocate`), tells it which tokens the runner
computed (`cache_computed`) and gives blocks back (`free`); the runner only reads
`request.block_ids`. It holds no tensors: a block is an index into the runner's KV tensors.

One request's blocks (block_size 4; 10 tokens known, 5 computed, 5 scheduled this step):

    block_ids  | [0]         | [1]         | [2]         |
    tokens     | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .. .. |
               | < computed   >< new this step    >< free slots >
    hash       | h0          | h1 once t7  | none while the block is partial
                               is computed

    h0 = H(ROOT, (t0..t3)), h1 = H(h0, (t4..t7)): a block's hash covers every token before it, so
    equal hashes mean equal prefixes and the prefix cache is a flat dict.

Every block is in exactly one state:
    used      ref_count > 0: in the block_ids of ref_count requests (more than one: a shared prefix)
    cached    ref_count == 0, hashed: in the free queue, reusable by a prefix hit until evicted
    free      ref_count == 0, not hashed: in the free queue
The free queue is the eviction order: hash-less blocks in front (nothing is lost reusing them),
then cached blocks from least to most recently freed. `allocate` pops the front, dropping the hash
of a cached block it takes. All `num_blocks` blocks are usable: none is reserved (block 0 is an
ordinary block; the runner pads with its own sentinel slot, not with a block of ours).

Sliding window W (Mistral): a query at position p attends to positions (p - W, p] only. So when
a step computes tokens from position c on, no query of it or of any later step reads a position
before c - W + 1, and `allocate` first releases the request's blocks that lie wholly before it,
leaving NULL_BLOCK in their place so that `block_ids[p // block_size]` still finds position p:

    W = 6, c = 13:    block_ids | NULL        | NULL        | [2]         | [3]         |
                      tokens    | t0 .. t3    | t4 .. t7    | t8 .. t11   | t12 ..      |
                                  released, still cached     ^ c - W + 1 = 8: the window's start

The window only moves forward, so the NULLs are always a prefix of a request's block_ids. A
released block is an ordinary unreferenced one: hashed, it stays in the prefix cache and joins the
back of the free queue (the most recently used); hash-less, the front.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.engine.request import Request

ROOT_HASH = 0  # the parent hash of a request's first block
NULL_BLOCK = -1  # in request.block_ids: a block released because it fell out of the window


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained hash of one full block. sha256, not hash(): tenants must not collide on purpose."""
    data = parent_hash.to_bytes(32, "little") + array("q", token_ids).tobytes()
    return int.from_bytes(hashlib.sha256(data).digest(), "little")


@dataclass(slots=True)
class Block:
    block_id: int  # index into the runner's KV tensors
    ref_count: int = 0  # requests whose block_ids hold it
    block_hash: int | None = None  # set once full and computed, if no other block has this hash


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 sliding_window: int | None = None):
        assert num_blocks > 0 and block_size > 0 and (sliding_window is None or sliding_window > 0)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window  # None: every query attends to its whole context
        self.blocks = [Block(i) for i in range(num_blocks)]  # indexed by block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref 0
        self.cached: dict[int, int] = {}  # block hash -> id of the one block holding that hash
        self.holders: dict[str, Request] = {}  # requests holding blocks, by id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate` may hand out: free ones and unreferenced cached ones."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached, unreferenced ones are free)."""
        return 1.0 - len(self.free_queue) / len(self.blocks)

    def match_prefix(self, request: Request) -> list[int]:
        """Ids of the cached blocks holding the longest prefix of the request's tokens.

        The hit never covers the last token: it must be recomputed to get logits. Nothing is
        referenced yet; pass the result to `allocate`.
        """
        if not self.enable_prefix_caching:
            return []
        num_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._block_hashes(request, num_blocks)[:num_blocks]:
            if (block_id := self.cached.get(block_hash)) is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, request: Request, num_new_tokens: int,
                 prefix_blocks: Sequence[int] = ()) -> bool:
        """Make room for `num_new_tokens` tokens after the computed ones; all or nothing.

        `prefix_blocks` (from `match_prefix`, only for a request holding no blocks) are taken
        first and count as computed. Returns False when blocks run short, changing nothing but
        the release of the blocks that fell out of the sliding window, which no query reads again.
        """
        assert not (prefix_blocks and request.block_ids)
        num_computed = request.num_computed_tokens + len(prefix_blocks) * self.block_size
        num_skipped = self._num_skipped_blocks(num_computed)
        self._release_out_of_window(request, num_skipped)
        # Hits before the window are never read: they stay where they are, unreferenced.
        taken = [b for i, b in enumerate(prefix_blocks) if i >= num_skipped]
        num_held = len(request.block_ids) + len(prefix_blocks)
        num_missing = -(-(num_computed + num_new_tokens) // self.block_size) - num_held
        num_revived = sum(self.blocks[b].ref_count == 0 for b in taken)
        if num_missing > len(self.free_queue) - num_revived:
            return False
        for block_id in taken:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        request.block_ids.extend([NULL_BLOCK] * (len(prefix_blocks) - len(taken)))
        request.block_ids.extend(taken)
        request.block_ids.extend(self._pop_free() for _ in range(num_missing))
        if request.block_ids:
            self.holders[request.request_id] = request
        return True

    def cache_computed(self, request: Request, num_new_tokens: int) -> None:
        """Register the blocks that the runner's `num_new_tokens` tokens just filled.

        Call before advancing `request.num_computed_tokens`. A block whose hash another block
        already holds stays unregistered: the cache keeps one block per prefix.
        """
        if not self.enable_prefix_caching:
            return
        first = request.num_computed_tokens // self.block_size
        end = (request.num_computed_tokens + num_new_tokens) // self.block_size
        if first == end:
            return
        hashes = self._block_hashes(request, end)
        for i in range(first, end):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None and hashes[i] not in self.cached:
                block.block_hash = hashes[i]
                self.cached[hashes[i]] = block.block_id

    def free(self, request: Request) -> None:
        """Release the request's blocks, last first, so its tail is evicted before its prefix."""
        for block_id in reversed(request.block_ids):
            if block_id != NULL_BLOCK:
                self._release(block_id)
        request.block_ids.clear()
        self.holders.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after new weights); blocks in use stay in use."""
        for block_id in self.cached.values():
            self.blocks[block_id].block_hash = None
        self.cached.clear()

    def check_integrity(self) -> None:
        """Assert every invariant in the module docstring; cheap enough to call after each step."""
        refs = Counter(b for r in self.holders.values() for b in r.block_ids if b != NULL_BLOCK)
        num_used = num_cached = num_free = 0
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], block
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
            if block.block_hash is not None:
                assert self.cached[block.block_hash] == block.block_id, block
            num_used += block.ref_count > 0
            num_cached += block.ref_count == 0 and block.block_hash is not None
            num_free += block.ref_count == 0 and block.block_hash is None
        assert num_free + num_cached + num_used == len(self.blocks)
        assert num_free + num_cached == len(self.free_queue)
        assert len(self.cached) == sum(b.block_hash is not None for b in self.blocks)
        for request in self.holders.values():
            held = [b for b in request.block_ids if b != NULL_BLOCK]
            num_null = len(request.block_ids) - len(held)
            assert held and len(set(held)) == len(held)
            # Released blocks are a prefix, all before the window of the next query.
            assert request.block_ids[:num_null] == [NULL_BLOCK] * num_null
            assert num_null <= self._num_skipped_blocks(request.num_computed_tokens)
            assert request.num_computed_tokens <= len(request.block_ids) * self.block_size
            # The prefix cache agrees with its users: a hashed block a request holds at
            # position i caches that request's own prefix up to block i.
            for i, block_id in enumerate(request.block_ids[num_null:], start=num_null):
                if (block_hash := self.blocks[block_id].block_hash) is not None:
                    assert request.block_hashes[i] == block_hash, block_id

    def _num_skipped_blocks(self, num_computed: int) -> int:
        """Blocks wholly before the window of a query at position `num_computed`."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed - self.sliding_window + 1) // self.block_size

    def _release_out_of_window(self, request: Request, num_skipped: int) -> None:
        """Release `block_ids[:num_skipped]`, last first as `free` does; NULL_BLOCK stays.
        A request admitted with a prefix hit holds no blocks yet: nothing to release."""
        for i in range(min(num_skipped, len(request.block_ids)) - 1, -1, -1):
            if request.block_ids[i] == NULL_BLOCK:
                break  # the ones before were released by an earlier step
            self._release(request.block_ids[i])
            request.block_ids[i] = NULL_BLOCK

    def _release(self, block_id: int) -> None:
        """Drop one reference; an unreferenced block joins the free queue, a hash-less one in
        front (nothing is lost reusing it), a cached one at the back (most recently used)."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.block_hash is None:
                self.free_queue.move_to_end(block_id, last=False)

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: the least recently freed cached block
            del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """`request.block_hashes`, extended to cover at least its first `num_blocks` blocks.

        Tokens never change once known, so the hashes stay valid across preemption.
        """
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            tokens, size = request.all_token_ids, self.block_size
            assert num_blocks * size <= len(tokens)
            parent = hashes[-1] if hashes else ROOT_HASH
            for i in range(len(hashes), num_blocks):
                parent = hash_block(parent, tokens[i * size:(i + 1) * size])
                hashes.append(parent)
        return hashes
