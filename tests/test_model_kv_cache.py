"""Prefill + decode through the static KV cache equals the cache-free forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import write_tiny_model

from gateway.model import LlamaRunner
from quantize.errors import UserInputError


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> LlamaRunner:
    model_dir = write_tiny_model(tmp_path_factory.mktemp("kv"))
    return LlamaRunner.load(model_dir, num_slots=4, max_model_len=48)


def test_interleaved_slots_of_different_lengths(runner: LlamaRunner) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = runner.spec.vocab_size
    # slot -> (prompt length, total length); slot 2 is reused after slot 0's old contents.
    plans = {0: (5, 30), 3: (17, 26), 1: (1, 20), 2: (9, 40)}
    seqs = {
        slot: torch.randint(0, vocab, (total,), generator=gen) for slot, (_, total) in plans.items()
    }
    expected = {slot: runner.forward_logits(seq[None])[0] for slot, seq in seqs.items()}

    # Pollute the cache first so stale entries would show if masking were wrong.
    runner.prefill(2, torch.randint(0, vocab, (45,), generator=gen).tolist())

    for slot, (prompt, _) in plans.items():
        logits = runner.prefill(slot, seqs[slot][:prompt].tolist())
        torch.testing.assert_close(logits, expected[slot][prompt - 1], rtol=1e-4, atol=1e-4)
    position = {slot: prompt for slot, (prompt, _) in plans.items()}
    while True:
        live = [slot for slot, (_, total) in plans.items() if position[slot] < total]
        if not live:
            break
        # Batch order differs from slot order, and the batch shrinks as sequences finish.
        live = live[::-1] if len(live) % 2 else live
        slots = torch.tensor(live)
        pos = torch.tensor([position[s] for s in live])
        tokens = torch.stack([seqs[s][position[s]] for s in live])
        logits = runner.decode(slots, tokens, pos)
        for row, slot in enumerate(live):
            torch.testing.assert_close(
                logits[row], expected[slot][position[slot]], rtol=1e-4, atol=1e-4
            )
            position[slot] += 1


def test_chunked_prefill_with_start_pos(runner: LlamaRunner) -> None:
    seq = torch.randint(
        0, runner.spec.vocab_size, (33,), generator=torch.Generator().manual_seed(1)
    )
    expected = runner.forward_logits(seq[None])[0]
    for start, end in ((0, 10), (10, 11), (11, 33)):
        logits = runner.prefill(1, seq[start:end].tolist(), start_pos=start)
        torch.testing.assert_close(logits, expected[end - 1], rtol=1e-4, atol=1e-4)


def test_decode_step_is_static_in_kv_len(runner: LlamaRunner) -> None:
    # The graph-capturable step gives the same answer over the whole cache as over the filled part.
    seq = torch.randint(
        0, runner.spec.vocab_size, (12,), generator=torch.Generator().manual_seed(2)
    )
    runner.prefill(0, seq[:11].tolist())
    args = (torch.tensor([0]), seq[11:12], torch.tensor([11]))
    short = runner._decode_step(*args, kv_len=12)
    full = runner._decode_step(*args, kv_len=runner.max_model_len)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_bad_calls_raise_clear_errors(runner: LlamaRunner) -> None:
    with pytest.raises(ValueError, match=r"slot must be an integer in \[0, 4\)"):
        runner.prefill(4, [1, 2])
    with pytest.raises(ValueError, match="token_ids is empty"):
        runner.prefill(0, [])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 320\)"):
        runner.prefill(0, [1, 320])
    with pytest.raises(ValueError, match="past max_model_len 48"):
        runner.prefill(0, [1] * 10, start_pos=40)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 48\)"):
        runner.decode(torch.tensor([0]), torch.tensor([1]), torch.tensor([48]))
    with pytest.raises(ValueError, match="slots must be distinct"):
        runner.decode(torch.tensor([1, 1]), torch.tensor([1, 2]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="same non-zero length"):
        runner.decode(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="longer than max_model_len"):
        runner.forward_logits(torch.zeros(1, 49, dtype=torch.int64))


def test_pool_that_does_not_fit_gives_the_numbers(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path, max_position_embeddings=1 << 20)
    with pytest.raises(
        UserInputError,
        match=r"KV cache pool does not fit on cpu: 100000 slots .* need 100000\.00 GiB .* free",
    ):
        LlamaRunner.load(model_dir, num_slots=100_000, max_model_len=1 << 20)
