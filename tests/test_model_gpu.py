"""The runner on CUDA: same logits as on the CPU, and `_decode_step` captured in a CUDA graph."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures_model import write_gptq_checkpoint, write_tiny_model

from gateway.model.slots import SlotRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = write_tiny_model(tmp_path_factory.mktemp("hf"), attention_bias=True)
    return write_gptq_checkpoint(
        hf, tmp_path_factory.mktemp("w4"), bits=4, group_size=32, act_order=True
    )


# fp32 with the torch kernel checks the runner itself; fp16 with "auto" the production GPU path.
@pytest.mark.parametrize(("dtype", "kernel"), [("float32", "torch"), ("float16", "auto")])
def test_cuda_logits_match_cpu(checkpoint: Path, dtype: str, kernel: str) -> None:
    cpu = SlotRunner.load(checkpoint, num_slots=2, max_model_len=64)
    gpu = SlotRunner.load(
        checkpoint, device="cuda", dtype=dtype, num_slots=2, max_model_len=64, kernel=kernel
    )
    ids = torch.randint(0, cpu.spec.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    tolerance = 2e-3 if dtype == "float32" else 5e-2
    expected = cpu.forward_logits(ids)
    torch.testing.assert_close(
        gpu.forward_logits(ids).cpu(), expected, rtol=tolerance, atol=tolerance
    )
    got = gpu.prefill(1, ids[0, :12].tolist())
    torch.testing.assert_close(got.cpu(), expected[0, 11], rtol=tolerance, atol=tolerance)
    step = gpu.decode(torch.tensor([1]), ids[0, 12:13], torch.tensor([12]))
    torch.testing.assert_close(step[0].cpu(), expected[0, 12], rtol=tolerance, atol=tolerance)


def test_decode_step_replays_from_a_cuda_graph(checkpoint: Path) -> None:
    cpu = SlotRunner.load(checkpoint, num_slots=3, max_model_len=64)
    gpu = SlotRunner.load(
        checkpoint, device="cuda", dtype="float32", num_slots=3, max_model_len=64, kernel="torch"
    )
    seqs = torch.randint(
        0, cpu.spec.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1)
    )
    slots_used, prompt = [2, 0], [10, 6]
    expected = cpu.forward_logits(seqs)
    for row, slot in enumerate(slots_used):
        gpu.prefill(slot, seqs[row, : prompt[row]].tolist())

    # Static input buffers, as the engine's graph runner keeps them.
    slots = torch.tensor(slots_used, device="cuda")
    tokens = torch.zeros(2, dtype=torch.int64, device="cuda")
    positions = torch.zeros(2, dtype=torch.int64, device="cuda")

    def fill(offset: int) -> None:
        pos = [prompt[row] + offset for row in range(2)]
        tokens.copy_(torch.stack([seqs[row, pos[row]] for row in range(2)]))
        positions.copy_(torch.tensor(pos))

    fill(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):  # warm-up outside the graph (allocations, lazy kernel choices)
            gpu._decode_step(slots, tokens, positions, kv_len=64)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        logits = gpu._decode_step(slots, tokens, positions, kv_len=64)

    for offset in range(15):
        fill(offset)
        graph.replay()
        torch.cuda.synchronize()
        for row in range(2):
            want = expected[row, prompt[row] + offset]
            torch.testing.assert_close(logits[row].cpu(), want, rtol=2e-3, atol=2e-3)


def test_graph_decoder_matches_eager_step(checkpoint: Path) -> None:
    # The production decode (fused kernels replayed from a CUDA graph per batch bucket) against
    # the eager reference step, on batches that are padded up to their bucket.
    runner = SlotRunner.load(checkpoint, device="cuda", num_slots=5, max_model_len=64)
    assert runner.graph_decoder is not None
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, runner.spec.vocab_size, (5, 40), generator=gen)
    prompt = [7, 12, 3, 20, 9]
    for slot in range(5):
        runner.prefill(slot, seqs[slot, : prompt[slot]].tolist())
    for batch_slots in ([3], [0, 4, 1], [4, 3, 2, 1, 0]):
        for step in range(6):
            slots = torch.tensor(batch_slots, device="cuda")
            pos = torch.tensor([prompt[s] + step for s in batch_slots], device="cuda")
            tokens = seqs[batch_slots, pos.cpu()].cuda()
            with torch.inference_mode():
                eager = runner._decode_step(slots, tokens, pos, kv_len=64).clone()
            graphed = runner.decode(slots, tokens, pos)
            torch.testing.assert_close(graphed, eager, rtol=5e-2, atol=5e-2)
        prompt = [p + 6 if s in batch_slots else p for s, p in enumerate(prompt)]
