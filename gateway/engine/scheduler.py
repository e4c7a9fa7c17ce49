"""What each engine step computes: admission, the token budget, preemption, prefix matching.

Every sequence is a list of token ids (prompt, then the tokens sampled so far) of which the first
`num_computed` have their KV in the cache. A step gives each scheduled sequence a number of new
tokens to compute: the rest of its prompt (cut to the step's token budget: chunked prefill) or, once
caught up, the one token it sampled last. Prompt chunks and decode rows go into the same forward
pass. A sequence whose last token is computed in this step gets a sampled token.

Order is arrival order. Running sequences are served first, so decoding streams keep flowing while
new prompts are prefilled in the budget left over. When a running sequence cannot get a block, the
most recently admitted running sequence is preempted: its blocks are freed and it returns to the
front of the waiting queue, to be recomputed from its tokens later (prefix caching often finds its
own blocks still there). Nothing here knows about threads, tensors or the model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gateway.engine.block_manager import BlockManager


@dataclass(eq=False)
class ScheduledSequence:
    key: int
    token_ids: list[int]  # shared with the engine, which appends sampled tokens
    prompt_len: int
    num_computed: int = 0
    admitted: bool = False  # holds one of the max_num_seqs places (kept while preempted)
    running: bool = False
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len


@dataclass(frozen=True)
class ScheduledChunk:
    seq: ScheduledSequence
    start: int  # first position computed
    num_tokens: int
    sample: bool  # the chunk reaches the sequence's last token: sample the next one

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    newly_admitted: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[ScheduledSequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[ScheduledSequence] = deque()
        self.running: list[ScheduledSequence] = []  # admission order
        self.num_admitted = 0
        self.preemptions_total = 0

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def add(self, seq: ScheduledSequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: ScheduledSequence) -> None:
        """Drop `seq` wherever it is and free its blocks (finished, cancelled, failed)."""
        if seq.running:
            self.running.remove(seq)
            seq.running = False
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.admitted:
            seq.admitted = False
            self.num_admitted -= 1
        self.blocks.free(seq.key)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- one step -----------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if not seq.running:  # preempted earlier in this loop
                continue
            count = min(seq.num_tokens - seq.num_computed, budget)
            if count <= 0:
                continue
            while not self.blocks.grow(seq.key, seq.num_computed + count):
                victim = next(s for s in reversed(self.running) if s.key not in scheduled)
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if not seq.running:
                continue
            scheduled.add(seq.key)
            plan.chunks.append(self._chunk(seq, count))
            budget -= count
        if plan.preempted:
            return plan  # memory is short: admit nothing new this step
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if not seq.admitted and self.num_admitted >= self.max_num_seqs:
                break
            if not self._admit(seq, budget, plan):
                break
            self.waiting.popleft()
            budget -= plan.chunks[-1].num_tokens
        return plan

    def commit(self, plan: StepPlan) -> None:
        """The step ran: its tokens are in the cache (and full blocks join the prefix cache)."""
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.num_tokens
            self.blocks.cache_computed(seq.key, seq.token_ids, seq.num_computed)

    # ---- internals ----------------------------------------------------------------------------

    def _admit(self, seq: ScheduledSequence, budget: int, plan: StepPlan) -> bool:
        cached = self.blocks.allocate_prefix(seq.key, seq.token_ids)
        count = min(seq.num_tokens - cached, budget)
        if not self.blocks.grow(seq.key, cached + count):
            self.blocks.free(seq.key)
            # Count the lookup once: it is repeated when the sequence is tried again.
            self.blocks.stats.queries -= seq.num_tokens
            self.blocks.stats.hits -= cached
            return False
        seq.num_computed = cached
        if not seq.admitted:
            seq.admitted = True
            self.num_admitted += 1
            plan.newly_admitted.append(seq)
        seq.running = True
        self.running.append(seq)
        plan.chunks.append(self._chunk(seq, count))
        return True

    def _preempt(self, seq: ScheduledSequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        seq.running = False
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.preemptions_total += 1
        self.blocks.free(seq.key)
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    @staticmethod
    def _chunk(seq: ScheduledSequence, count: int) -> ScheduledChunk:
        start = seq.num_computed
        return ScheduledChunk(seq, start, count, sample=start + count == seq.num_tokens)
