"""The paged runner: mixed prefill and decode steps through shuffled block tables equal the
cache-free forward pass; sizing of the pool; bad calls raise clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import write_tiny_model

from gateway.model import LlamaRunner
from gateway.model.kv_cache import parse_size
from gateway.model.slots import SlotRunner
from gateway.model.step_batch import SeqChunk
from quantize.errors import UserInputError

BLOCK = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("kv"))


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> LlamaRunner:
    return LlamaRunner.load(model_dir, max_model_len=48, num_blocks=64, block_size=BLOCK)


def test_mixed_steps_over_shuffled_blocks_equal_the_full_forward(runner: LlamaRunner) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = runner.spec.vocab_size
    totals = [30, 26, 20, 40]
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in totals]
    expected = [runner.forward_logits(s[None])[0] for s in seqs]
    order = torch.randperm(64, generator=gen).tolist()
    tables, used = [], 0
    for n in totals:
        need = -(-n // BLOCK)
        tables.append(order[used : used + need])
        used += need
    # Pollute every block first, so a wrong read or mask would show.
    junk = torch.randint(0, vocab, (48,), generator=gen).tolist()
    runner.execute([SeqChunk(junk, 0, list(range(12)))])
    # Step plan: (sequence, tokens this step); chunked prompts ride with other rows' decodes.
    done = [0] * len(seqs)
    plans = [[(0, 5), (2, 1)], [(0, 1), (1, 17), (2, 9)], [(0, 1), (1, 1), (3, 13), (2, 1)]]
    plans += [[(i, 1) for i in (3, 2, 1, 0)]] * 8
    plans += [[(3, 11), (1, 1)]]
    for wanted in plans:
        plan = [(i, min(c, totals[i] - done[i])) for i, c in wanted if done[i] < totals[i]]
        chunks = []
        for i, count in plan:
            ids = seqs[i][done[i] : done[i] + count].tolist()
            chunks.append(SeqChunk(ids, done[i], tables[i]))
        logits = runner.execute(chunks)
        assert logits.shape == (len(plan), vocab)
        for row, (i, count) in enumerate(plan):
            done[i] += count
            torch.testing.assert_close(logits[row], expected[i][done[i] - 1], rtol=1e-4, atol=1e-4)
    assert done[1:] == [26, 19, 32]


def test_unsampled_chunks_return_no_logits(runner: LlamaRunner) -> None:
    seq = torch.randint(0, runner.spec.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    expected = runner.forward_logits(seq[None])[0]
    table = [40, 41, 42]
    first = runner.execute([SeqChunk(seq[:4].tolist(), 0, table, sample=False)])
    assert first.shape == (0, runner.spec.vocab_size)
    rest = runner.execute([SeqChunk(seq[4:].tolist(), 4, table)])
    torch.testing.assert_close(rest[0], expected[8], rtol=1e-4, atol=1e-4)


def test_slot_runner_keeps_the_old_per_slot_calls(model_dir: Path) -> None:
    slots = SlotRunner.load(model_dir, num_slots=3, max_model_len=40)
    seq = torch.randint(0, slots.spec.vocab_size, (33,), generator=torch.Generator().manual_seed(2))
    expected = slots.forward_logits(seq[None])[0]
    for start, end in ((0, 10), (10, 11), (11, 30)):
        logits = slots.prefill(1, seq[start:end].tolist(), start_pos=start)
        torch.testing.assert_close(logits, expected[end - 1], rtol=1e-4, atol=1e-4)
    step = slots.decode(torch.tensor([1]), seq[30:31], torch.tensor([30]))
    torch.testing.assert_close(step[0], expected[30], rtol=1e-4, atol=1e-4)


def test_bad_calls_raise_clear_errors(runner: LlamaRunner, model_dir: Path) -> None:
    table = [0, 1, 2]
    with pytest.raises(ValueError, match="at least one chunk"):
        runner.execute([])
    with pytest.raises(ValueError, match="token_ids is empty"):
        runner.execute([SeqChunk([], 0, table)])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 320\)"):
        runner.execute([SeqChunk([1, 320], 0, table)])
    with pytest.raises(ValueError, match="past max_model_len 48"):
        runner.execute([SeqChunk([1] * 10, 40, list(range(13)))])
    with pytest.raises(ValueError, match="covers 12 positions, the chunk ends at 13"):
        runner.execute([SeqChunk([1], 12, table)])
    with pytest.raises(ValueError, match=r"block ids must lie in \[0, 64\)"):
        runner.execute([SeqChunk([1], 0, [64])])
    with pytest.raises(ValueError, match="longer than max_model_len"):
        runner.forward_logits(torch.zeros(1, 49, dtype=torch.int64))
    slots = SlotRunner.load(model_dir, num_slots=2, max_model_len=16)
    with pytest.raises(ValueError, match=r"slot must be an integer in \[0, 2\)"):
        slots.prefill(2, [1, 2])
    with pytest.raises(ValueError, match="slots must be distinct"):
        slots.decode([1, 1], [1, 2], [3, 3])


def test_pool_is_sized_from_bytes_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path, max_position_embeddings=1 << 20)
    # The tiny model: 2 layers x 2 kv heads x 16 dims x 2 (k, v) x 4 bytes x 16 tokens a block.
    runner = LlamaRunner.load(model_dir, max_model_len=64, kv_cache_bytes=parse_size("64Ki"))
    assert runner.spec.block_size == 16
    block_bytes = runner.cache.shape.block_bytes
    assert runner.spec.num_blocks == (64 << 10) // block_bytes
    with pytest.raises(UserInputError, match="hold no KV block"):
        LlamaRunner.load(model_dir, max_model_len=64, kv_cache_bytes=block_bytes - 1)
    with pytest.raises(
        UserInputError, match=r"KV cache pool does not fit on cpu: 10000000000 blocks .* free"
    ):
        LlamaRunner.load(model_dir, max_model_len=64, num_blocks=10_000_000_000)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1024", 1024), ("1GiB", 1 << 30), ("512Mi", 512 << 20), ("2G", 2 * 10**9), ("1.5K", 1500)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12Q", "-1", "0", "GiB"])
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)
