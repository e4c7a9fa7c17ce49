"""Batched token sampling with per-request parameters.

One call handles a whole decode batch with a fixed, small number of tensor ops: each request's
parameters live in per-slot device tensors (uploaded once, when the request is admitted), a step
gathers them by slot, and rows that do not use a feature get neutral values (penalty 1, top-k off)
instead of being split out, so no step pays a host-to-device copy per feature. Features nobody in
the batch uses are skipped; an all-greedy batch costs one argmax.

Sampling is the Gumbel-max trick (argmax of logits/T plus Gumbel noise), which lets each seeded
request draw its noise from its own `torch.Generator`: the tokens it gets depend only on its seed
and its own logits, never on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from gateway.engine.grammar import TokenMask, apply_token_bitmask
from gateway.engine.params import SamplingParams

NEG_INF = float("-inf")
# Top-p values at or above this are "disabled" (cumsum rounding could otherwise drop the tail).
TOP_P_DISABLED = 2.0
# Top-p first looks at this many best tokens; only if they do not reach p is the row fully sorted.
TOP_P_CANDIDATES = 1024
# Columns of the per-slot parameter table.
_TEMPERATURE, _TOP_P, _TOP_K, _REPETITION, _FREQUENCY, _PRESENCE, _GREEDY = range(7)
_COLUMNS = 7


@dataclass(slots=True)
class RowLogprobs:
    """Raw-model log-probabilities for one sampled row."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]
    # Per row: None, or why the row could not be sampled (non-finite logits).
    errors: list[str | None]


@dataclass(slots=True)
class _SlotState:
    params: SamplingParams
    prompt_ids: Sequence[int]
    banned_before_min: tuple[int, ...]  # EOS and stop ids, masked until min_tokens are out
    row: tuple[float, ...]  # this request's line of the parameter table
    num_generated: int = 0
    generator: torch.Generator | None = None
    uploaded: bool = False  # its line is in the device parameter table
    penalty_rows_ready: bool = False  # its lines of the penalty tables were reset


@dataclass(slots=True)
class _Batch:
    """What one step's rows use, decided on the host from the requests' parameters."""

    slot_index: torch.Tensor | None  # None when no row needs the parameter table
    params: torch.Tensor | None  # [B, _COLUMNS]
    any_greedy: bool
    any_sampled: bool
    any_penalties: bool
    top_k_candidates: int  # 0: no top-k or top-p in the batch
    any_top_k: bool
    any_top_p: bool
    logprobs_width: int  # -1: no row wants logprobs


class Sampler:
    """Per-slot sampling state plus the batched `sample` call. Not thread-safe: the engine loop
    thread is its only user."""

    def __init__(self, num_slots: int, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._num_slots = num_slots
        self._vocab_size = vocab_size
        self._eos_token_ids = tuple(sorted(set(eos_token_ids)))
        self._slots: list[_SlotState | None] = [None] * num_slots
        self._device: torch.device | None = None
        self._table: torch.Tensor | None = None  # [slots, _COLUMNS] parameters, on the device
        # Penalty state, allocated on first use: [slots, vocab].
        self._seen: torch.Tensor | None = None  # token occurs in prompt or output
        self._counts: torch.Tensor | None = None  # occurrences in the output
        self._shared_generator: torch.Generator | None = None

    def add(self, slot: int, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        banned = tuple(sorted(set(self._eos_token_ids) | set(params.stop_token_ids)))
        banned = tuple(t for t in banned if 0 <= t < self._vocab_size)
        if params.guided is not None:
            # The grammar decides when the output may end; banning EOS too could leave a
            # complete grammar's row with no allowed token at all.
            banned = ()
        # Greedy rows get neutral sampling values: their filters must not widen the batch's work.
        greedy = params.greedy
        top_k = params.top_k if 0 < params.top_k < self._vocab_size and not greedy else 0
        row = (
            1.0 if greedy else float(params.temperature),
            float(params.top_p) if params.top_p < 1.0 and not greedy else TOP_P_DISABLED,
            float(top_k or self._vocab_size),
            float(params.repetition_penalty),
            float(params.frequency_penalty),
            float(params.presence_penalty),
            1.0 if greedy else 0.0,
        )
        self._slots[slot] = _SlotState(params, prompt_ids, banned, row)

    def remove(self, slot: int) -> None:
        self._slots[slot] = None

    def num_generated(self, slot: int) -> int:
        state = self._slots[slot]
        return 0 if state is None else state.num_generated

    # ------------------------------------------------------------------------------ step

    def sample(
        self, slots: Sequence[int], logits: torch.Tensor, mask: TokenMask | None = None
    ) -> SampleResult:
        """Pick one token per row of `logits` [len(slots), vocab] for the request in each slot.

        `mask`: the allowed tokens of the grammar-constrained rows (gateway/engine/grammar.py),
        applied after the penalties and before temperature and top-k/top-p; logprobs stay the
        raw model's."""
        states = [self._require_state(slot) for slot in slots]
        logits = logits.float()
        batch = self._batch(slots, states, logits.device)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.logprobs_width >= 0 else None
        processed = self._penalized(slots, states, logits, batch)
        processed = self._mask_until_min_tokens(states, processed, logits)
        processed = _mask_grammar_rows(processed, logits, mask)
        if batch.any_sampled:
            assert batch.params is not None
            tokens = self._sample_rows(states, processed, batch.params, batch)
            if batch.any_greedy:
                greedy_rows = batch.params[:, _GREEDY] > 0
                tokens = torch.where(greedy_rows, processed.argmax(dim=1), tokens)
        else:
            tokens = processed.argmax(dim=1)
        picked = processed.gather(1, tokens.unsqueeze(1)).squeeze(1)
        # One device-to-host transfer for everything the host needs from this step.
        # |x| < inf is False for NaN and for +-inf (one kernel; torch.isfinite takes several).
        parts = [tokens.double(), (picked.abs() < float("inf")).double()]
        if raw_logprobs is not None:
            parts.append(raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).double())
            if batch.logprobs_width > 0:
                values, ids = raw_logprobs.topk(batch.logprobs_width, dim=1)
                parts += [ids.double().t().reshape(-1), values.double().t().reshape(-1)]
        host = torch.cat(parts).tolist()
        rows = len(slots)
        token_list = [int(t) for t in host[:rows]]
        finite = [v > 0 for v in host[rows : 2 * rows]]
        logprobs = self._logprobs(states, host, rows, batch.logprobs_width)
        self._record(states, tokens, batch)
        errors = [
            None if ok else "the model produced non-finite logits (NaN or inf)" for ok in finite
        ]
        return SampleResult(token_list, logprobs, errors)

    def _require_state(self, slot: int) -> _SlotState:
        state = self._slots[slot]
        if state is None:
            raise KeyError(f"no request is registered in sampler slot {slot}")
        return state

    def _batch(
        self, slots: Sequence[int], states: list[_SlotState], device: torch.device
    ) -> _Batch:
        table = self._parameter_table(device)
        params = [state.params for state in states]
        greedy = [p.greedy for p in params]
        any_sampled = not all(greedy)
        any_penalties = any(p.uses_penalties for p in params)
        slot_index = batch_params = None
        if any_sampled or any_penalties:
            self._upload(slots, states, table)
            slot_index = torch.tensor(list(slots), device=device)
            batch_params = table.index_select(0, slot_index)
        vocab = self._vocab_size
        any_top_k = any_sampled and any(
            0 < p.top_k < vocab for p, g in zip(params, greedy, strict=True) if not g
        )
        any_top_p = any_sampled and any(
            p.top_p < 1.0 for p, g in zip(params, greedy, strict=True) if not g
        )
        candidates = 0
        if any_top_k or any_top_p:
            # Each sampled row needs its k best tokens, or TOP_P_CANDIDATES for top-p alone.
            candidates = max(
                (p.top_k if 0 < p.top_k < vocab else TOP_P_CANDIDATES if p.top_p < 1.0 else 1)
                for p, g in zip(params, greedy, strict=True)
                if not g
            )
        widths = [p.logprobs for p in params if p.logprobs is not None]
        return _Batch(
            slot_index=slot_index,
            params=batch_params,
            any_greedy=any(greedy),
            any_sampled=any_sampled,
            any_penalties=any_penalties,
            top_k_candidates=min(candidates, vocab),
            any_top_k=any_top_k,
            any_top_p=any_top_p,
            logprobs_width=max(widths) if widths else -1,
        )

    @staticmethod
    def _upload(slots: Sequence[int], states: list[_SlotState], table: torch.Tensor) -> None:
        fresh = [
            (slot, state) for slot, state in zip(slots, states, strict=True) if not state.uploaded
        ]
        if not fresh:
            return
        index = torch.tensor([slot for slot, _ in fresh], device=table.device)
        rows = torch.tensor([state.row for _, state in fresh], dtype=torch.float32)
        table.index_copy_(0, index, rows.to(table.device))
        for _, state in fresh:
            state.uploaded = True

    def _parameter_table(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._device != device:
            self._device = device
            self._table = torch.zeros(self._num_slots, _COLUMNS, device=device)
            self._seen = self._counts = None
            self._shared_generator = None
            for state in self._slots:
                if state is not None:
                    state.uploaded = state.penalty_rows_ready = False
                    state.generator = None
        return self._table

    def _penalized(
        self,
        slots: Sequence[int],
        states: list[_SlotState],
        logits: torch.Tensor,
        batch: _Batch,
    ) -> torch.Tensor:
        if not batch.any_penalties:
            return logits
        seen, counts = self._penalty_tables(logits.device)
        for slot, state in zip(slots, states, strict=True):
            if state.params.uses_penalties and not state.penalty_rows_ready:
                self._reset_penalty_rows(slot, state, seen, counts)
        # Rows without penalties carry neutral values (1, 0, 0), so the whole batch goes through.
        params, slot_index = batch.params, batch.slot_index
        assert params is not None and slot_index is not None
        return penalize(
            logits,
            seen.index_select(0, slot_index),
            counts.index_select(0, slot_index),
            params[:, _REPETITION : _REPETITION + 1],
            params[:, _FREQUENCY : _FREQUENCY + 1],
            params[:, _PRESENCE : _PRESENCE + 1],
        )

    def _penalty_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._seen is None or self._counts is None:
            shape = (self._num_slots, self._vocab_size)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=device)
            self._counts = torch.zeros(shape, dtype=torch.float32, device=device)
            for state in self._slots:
                if state is not None:
                    state.penalty_rows_ready = False
        return self._seen, self._counts

    def _reset_penalty_rows(
        self, slot: int, state: _SlotState, seen: torch.Tensor, counts: torch.Tensor
    ) -> None:
        seen[slot].zero_()
        counts[slot].zero_()
        prompt = [t for t in state.prompt_ids if 0 <= t < self._vocab_size]
        if prompt:
            seen[slot, torch.tensor(prompt, device=seen.device)] = True
        state.penalty_rows_ready = True

    def _mask_until_min_tokens(
        self, states: list[_SlotState], processed: torch.Tensor, raw: torch.Tensor
    ) -> torch.Tensor:
        for i, state in enumerate(states):
            if state.num_generated >= state.params.min_tokens or not state.banned_before_min:
                continue
            if processed is raw:
                processed = raw.clone()
            processed[i, list(state.banned_before_min)] = NEG_INF
        return processed

    def _sample_rows(
        self, states: list[_SlotState], processed: torch.Tensor, params: torch.Tensor, batch: _Batch
    ) -> torch.Tensor:
        scaled = processed / params[:, _TEMPERATURE : _TEMPERATURE + 1]
        if batch.top_k_candidates:
            scaled = _filter(
                scaled,
                params[:, _TOP_K].long() if batch.any_top_k else None,
                params[:, _TOP_P : _TOP_P + 1] if batch.any_top_p else None,
                batch.top_k_candidates,
            )
        # Gumbel-max: argmax(logits/T - log(-log(U))) samples softmax(logits/T). U = 0 gives -inf
        # (never picked); uniform_ never returns 1, so the inner log is never log(0).
        uniform = torch.empty_like(scaled)
        uniform.uniform_(generator=self._shared(scaled.device))
        for i, state in enumerate(states):
            # A seeded request draws only from its own generator, exactly once per sampled step.
            if state.params.seed is not None and not state.params.greedy:
                uniform[i].uniform_(generator=self._own_generator(state, scaled.device))
        return (scaled - uniform.log_().neg_().log_()).argmax(dim=1)

    def _shared(self, device: torch.device) -> torch.Generator:
        if self._shared_generator is None:
            self._shared_generator = torch.Generator(device=device)
            self._shared_generator.seed()
        return self._shared_generator

    @staticmethod
    def _own_generator(state: _SlotState, device: torch.device) -> torch.Generator:
        if state.generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(state.params.seed or 0)
            state.generator = generator
        return state.generator

    def _logprobs(
        self, states: list[_SlotState], host: list[float], rows: int, width: int
    ) -> list[RowLogprobs | None]:
        result: list[RowLogprobs | None] = [None] * rows
        if width < 0:
            return result
        chosen = host[2 * rows : 3 * rows]
        ids_at, values_at = 3 * rows, 3 * rows + width * rows
        for i, state in enumerate(states):
            n = state.params.logprobs
            if n is None:
                continue
            # Top values were laid out column by column: entry j of row i is at j * rows + i.
            top_ids = [int(host[ids_at + j * rows + i]) for j in range(n)]
            top_values = [host[values_at + j * rows + i] for j in range(n)]
            result[i] = RowLogprobs(chosen[i], top_ids, top_values)
        return result

    def _record(self, states: list[_SlotState], tokens: torch.Tensor, batch: _Batch) -> None:
        for state in states:
            state.num_generated += 1
        slot_index = batch.slot_index
        if not batch.any_penalties or slot_index is None or self._seen is None:
            return
        assert self._counts is not None
        # Every row is recorded (one scatter); rows of requests without penalties are never read,
        # and a slot's rows are reset when a request with penalties takes it.
        # Slots in a batch are distinct, so no (slot, token) pair repeats: a plain gather and
        # scatter is exact (accumulating index_put sorts its indices on CUDA, which is slow).
        self._seen[slot_index, tokens] = True
        self._counts[slot_index, tokens] = self._counts[slot_index, tokens] + 1


def _mask_grammar_rows(
    processed: torch.Tensor, raw: torch.Tensor, mask: TokenMask | None
) -> torch.Tensor:
    """Only the constrained rows are gathered, masked and put back: unconstrained rows in the same
    batch cost nothing, and the raw logits (read for logprobs) are never written."""
    if mask is None:
        return processed
    if processed is raw:
        processed = raw.clone()
    rows = processed.index_select(0, mask.rows)
    apply_token_bitmask(rows, mask.bitmask)
    return processed.index_copy_(0, mask.rows, rows)


def penalize(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Apply the three penalties to rows of logits.

    `seen` (bool) marks tokens in the prompt or output and `counts` counts them in the output;
    the penalties are [rows, 1] columns. HF repetition penalty: a seen token's positive logit is
    divided by the penalty and a negative one multiplied. OpenAI: minus frequency * count, minus
    presence once the token has appeared in the output. Penalties of 1, 0, 0 change nothing.
    """
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf what top-k then top-p remove (HF semantics: ties at the k-th value are kept;
    top-p keeps the smallest set of best tokens whose probability reaches p, at least one).
    `top_k` 0 and `top_p` 1.0 disable a filter for that row."""
    vocab = logits.shape[1]
    device = logits.device
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    use_k = any(k < vocab for k in ks)
    use_p = any(p < 1.0 for p in top_p)
    if not use_k and not use_p:
        return logits
    needed = [
        k if k < vocab else (TOP_P_CANDIDATES if p < 1.0 else 1)
        for k, p in zip(ks, top_p, strict=True)
    ]
    k_tensor = torch.tensor(ks, device=device) if use_k else None
    p_column = None
    if use_p:
        p_values = [p if p < 1.0 else TOP_P_DISABLED for p in top_p]
        p_column = torch.tensor(p_values, device=device, dtype=logits.dtype).unsqueeze(1)
    return _filter(logits, k_tensor, p_column, min(vocab, max(needed)))


def _filter(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    candidates: int,
) -> torch.Tensor:
    """Top-k ([B] ints, vocab = off) then top-p ([B, 1], >= 1 = off) from one ranking.

    One `topk` serves both filters: top-p only needs the best tokens in order, and a full sort of
    the vocabulary is slow, so it looks at the best `candidates` tokens and sorts everything only
    when those do not hold p of the mass.
    """
    vocab = logits.shape[1]
    values, order = _ranked(logits, candidates)
    kth = None
    if top_k is not None:
        k_index = (top_k - 1).unsqueeze(1)
        kth = values.gather(1, k_index.clamp(max=values.shape[1] - 1))
        # Rows whose k is off (= vocab) may lie past the candidates: keep everything there.
        kth = torch.where(k_index < values.shape[1], kth, torch.full_like(kth, NEG_INF))
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p is None:
        return logits
    enabled = top_p < 1.0
    # Probabilities over what top-k kept (its removed tokens are -inf, so they get 0).
    probs_all = torch.softmax(logits, dim=1)
    probs = probs_all.gather(1, order)
    mass = probs.cumsum(dim=1)
    # Tokens outside the candidates can be dropped only if the candidates reach p.
    if values.shape[1] < vocab and not bool(((mass[:, -1:] >= top_p) | ~enabled).all()):
        _, order = _ranked(logits, vocab)
        probs = probs_all.gather(1, order)
        mass = probs.cumsum(dim=1)
    # Drop a token once the better-ranked tokens already reach p; the best one always stays.
    drop = (mass - probs) >= top_p
    drop[:, 0] = False
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, ~drop)
    return logits.masked_fill(~(keep | ~enabled), NEG_INF)


def _ranked(logits: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    if count < logits.shape[1]:
        return logits.topk(count, dim=1)
    return logits.sort(dim=1, descending=True)
