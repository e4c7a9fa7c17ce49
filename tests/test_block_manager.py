"""The paged KV bookkeeping: allocation, prefix caching with reference counts, LRU eviction, and a
property test that random admit/grow/finish/cancel/preempt sequences never leak or double-free."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.block_manager import BlockManager, block_hashes
from gateway.engine.scheduler import ScheduledSequence, Scheduler


def test_hash_chains_over_the_whole_prefix() -> None:
    a = block_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    b = block_hashes([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and len(b) == 3  # the partial last block has no hash
    assert a[1] != b[1]  # same block tokens (3, 4), different prefix
    assert block_hashes([1, 2, 3, 4], 2) == a[:2]
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, a[0], start=2) == a[1:]


def test_grow_allocates_only_what_is_missing_and_refuses_past_the_pool() -> None:
    blocks = BlockManager(4, 4, prefix_caching=False)
    assert blocks.allocate_prefix(0, [1] * 5) == 0
    assert blocks.grow(0, 5) and len(blocks.table(0)) == 2
    assert blocks.grow(0, 8) and len(blocks.table(0)) == 2
    assert not blocks.grow(0, 17)  # 5 blocks of 4 > 4
    assert len(blocks.table(0)) == 2 and blocks.num_free_blocks == 2
    blocks.free(0)
    assert blocks.num_free_blocks == 4
    blocks.check_invariants()


def test_prefix_hit_shares_full_blocks_and_keeps_the_last_token_to_compute() -> None:
    blocks = BlockManager(16, 4)
    prompt = list(range(10))
    blocks.allocate_prefix(0, prompt)
    blocks.grow(0, 10)
    blocks.cache_computed(0, prompt, 10)  # blocks 0..7 full, 8..9 partial
    # Same 10 tokens: 2 full blocks cached (8 tokens); the 2 left are computed.
    assert blocks.allocate_prefix(1, prompt) == 8
    assert blocks.table(1)[:2] == blocks.table(0)[:2]
    # A prompt that ends exactly at a block boundary still computes its last block.
    assert blocks.allocate_prefix(2, prompt[:8]) == 4
    # A different first token shares nothing.
    assert blocks.allocate_prefix(3, [99, *prompt[1:]]) == 0
    assert blocks.stats.queries == 10 + 10 + 8 + 10 and blocks.stats.hits == 12
    blocks.check_invariants()


def test_freed_cached_blocks_are_reused_then_evicted_oldest_first() -> None:
    blocks = BlockManager(4, 2)
    first = [1, 2, 3, 4, 5]
    blocks.allocate_prefix(0, first)
    blocks.grow(0, 5)
    blocks.cache_computed(0, first, 5)
    blocks.free(0)
    assert blocks.num_free_blocks == 4  # cached blocks count as free
    assert blocks.allocate_prefix(1, first) == 4  # and still hit
    blocks.free(1)
    # A sequence needing the whole pool evicts them; the cache forgets them.
    blocks.allocate_prefix(2, [7] * 8)
    assert blocks.grow(2, 8)
    blocks.check_invariants()
    blocks.free(2)
    assert blocks.allocate_prefix(3, first) == 0
    blocks.check_invariants()


def test_no_prefix_caching_never_hits() -> None:
    blocks = BlockManager(8, 2, prefix_caching=False)
    blocks.allocate_prefix(0, [1, 2, 3])
    blocks.grow(0, 3)
    blocks.cache_computed(0, [1, 2, 3], 3)
    assert blocks.allocate_prefix(1, [1, 2, 3]) == 0
    assert blocks.stats.hits == 0


# ---- property test over the scheduler and block manager together ------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "step", "step", "step", "finish", "cancel"]),
        st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=OPS,
    num_blocks=st.integers(6, 24),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(1, 16),
    caching=st.booleans(),
)
def test_random_schedules_never_leak_or_double_free(
    ops: list[tuple[str, int]], num_blocks: int, block_size: int, budget: int, caching: bool
) -> None:
    blocks = BlockManager(num_blocks, block_size, prefix_caching=caching)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=budget)
    capacity = num_blocks * block_size
    live: list[ScheduledSequence] = []
    limits: dict[int, int] = {}
    next_key = 0
    for op, value in ops:
        if op == "add":
            # Few distinct prompts (value picks one), so prefixes are shared often.
            length = 1 + value % max(1, capacity // 2)
            prompt = [(value % 3 + i // 3) % 7 for i in range(length)]
            seq = ScheduledSequence(next_key, list(prompt), len(prompt))
            limits[next_key] = min(capacity, length + 1 + value % 5)
            next_key += 1
            sched.add(seq)
            live.append(seq)
        elif op == "step":
            plan = sched.schedule()
            for chunk in plan.chunks:
                table = blocks.table(chunk.seq.key)
                assert len(table) * block_size >= chunk.start + chunk.num_tokens
                assert chunk.start == chunk.seq.num_computed
            assert plan.num_tokens <= budget
            sched.commit(plan)
            for chunk in plan.chunks:
                seq = chunk.seq
                if not chunk.sample:
                    continue
                if seq.num_tokens >= limits[seq.key]:
                    sched.finish(seq)
                    live.remove(seq)
                else:
                    seq.token_ids.append(value % 7)
        elif live:
            seq = live.pop(value % len(live))
            sched.finish(seq)
        blocks.check_invariants()
        assert sched.num_admitted <= 4
        # Shared blocks belong to identical prefixes only.
        for seq in sched.running:
            for other in sched.running:
                shared = set(blocks.table(seq.key)) & set(blocks.table(other.key))
                if seq is not other and shared:
                    n = len(shared) * block_size
                    assert seq.token_ids[:n] == other.token_ids[:n]
    for seq in list(live):
        sched.finish(seq)
    blocks.check_invariants()
    assert blocks.num_free_blocks == num_blocks


def test_preemption_frees_the_latest_and_it_resumes_first() -> None:
    blocks = BlockManager(4, 2, prefix_caching=False)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    a = ScheduledSequence(0, [1, 2, 3], 3)
    b = ScheduledSequence(1, [4, 5, 6], 3)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert [c.seq.key for c in plan.chunks] == [0, 1] and blocks.num_free_blocks == 0
    sched.commit(plan)
    a.token_ids.append(7)  # a needs position 3 (in its 2nd block); b then needs position 3 too
    b.token_ids.append(8)
    a.token_ids.append(9)  # pretend a sampled twice: it needs a 3rd block
    a.num_computed = 4
    plan = sched.schedule()
    assert plan.preempted == [b] and b.num_computed == 0 and list(sched.waiting) == [b]
    assert [c.seq.key for c in plan.chunks] == [0]
    sched.commit(plan)
    sched.finish(a)
    plan = sched.schedule()  # b comes back and recomputes every token it had
    assert [(c.seq.key, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [(1, 0, 4, True)]
    assert plan.newly_admitted == []  # it kept its place while preempted


def test_budget_chunks_prompts_and_decodes_go_first() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=8)
    long = ScheduledSequence(0, list(range(20)), 20)
    sched.add(long)
    plan = sched.schedule()
    assert [(c.start, c.num_tokens, c.sample) for c in plan.chunks] == [(0, 8, False)]
    sched.commit(plan)
    short = ScheduledSequence(1, [5, 6], 2)
    sched.add(short)
    plan = sched.schedule()
    assert [(c.seq.key, c.start, c.num_tokens) for c in plan.chunks] == [(0, 8, 8)]
    sched.commit(plan)
    plan = sched.schedule()  # the long prompt's last 4, then the short one in what is left
    assert [(c.seq.key, c.start, c.num_tokens, c.sample) for c in plan.chunks] == [
        (0, 16, 4, True),
        (1, 0, 2, True),
    ]


def test_max_num_seqs_bounds_admission() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [ScheduledSequence(k, [k + 1], 1) for k in range(3)]
    for seq in seqs:
        sched.add(seq)
    plan = sched.schedule()
    assert [c.seq.key for c in plan.chunks] == [0, 1] and list(sched.waiting) == [seqs[2]]
    sched.finish(seqs[0])
    assert [c.seq.key for c in sched.schedule().chunks] == [1, 2]


@pytest.mark.parametrize("bad", [(0, 4), (4, 0)])
def test_bad_sizes_are_refused(bad: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(*bad)
