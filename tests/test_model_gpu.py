"""The paged runner on CUDA: the same logits as on the CPU for mixed prefill and decode steps
through shuffled block tables, and decode steps replayed from CUDA graphs equal the eager step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_model import write_gptq_checkpoint, write_tiny_model

from gateway.model import LlamaRunner
from gateway.model.slots import SlotRunner
from gateway.model.step_batch import SeqChunk, build_step_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


_GEMMA = {
    "head_dim": 64,
    "query_pre_attn_scalar": 48,
    "sliding_window": 32,
    "final_logit_softcapping": 5.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
FAMILIES = {
    "llama": {"attention_bias": True},
    # Per-head q/k RMSNorm ahead of the Triton rope+cache kernel; head_dim != hidden / heads.
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 64},
    # HF-fused qkv_proj / gate_up_proj, a sliding window on every layer.
    "phi3": {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "sliding_window": 32,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    },
    # Soft-capped attention: TorchOps on CUDA (no Triton kernel caps scores), so no CUDA graphs.
    "gemma2": {
        **_GEMMA, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "attn_logit_softcapping": 2.0,
    },
    # Triton path with a query scale, (1 + w) norms in fp32, q/k norms and a local rope table.
    "gemma3_text": {
        **_GEMMA, "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "sliding_window_pattern": 2, "rope_local_base_freq": 500.0,
    },
}  # fmt: skip
# Families whose attention the Triton kernels cannot do: served eagerly, without CUDA graphs.
NO_GRAPHS = {"gemma2"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = write_tiny_model(tmp_path_factory.mktemp("hf"), **FAMILIES[request.param])
    return write_gptq_checkpoint(
        hf, tmp_path_factory.mktemp("w4"), bits=4, group_size=32, act_order=True
    )


def _model_type(checkpoint: Path) -> str:
    return json.loads((checkpoint / "config.json").read_text())["model_type"]


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


def _shuffled_tables(totals: list[int], num_blocks: int, block: int, seed: int) -> list[list[int]]:
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, used = [], 0
    for n in totals:
        need = -(-n // block)
        tables.append(order[used : used + need])
        used += need
    return tables


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mixed_paged_steps_match_the_cpu_forward(checkpoint: Path, dtype: str) -> None:
    # Triton's paged prefill and decode attention read KV through shuffled blocks, with prompt
    # chunks of several sequences riding in the same step as other sequences' decode rows.
    block = 16
    cpu = LlamaRunner.load(checkpoint, max_model_len=96, num_blocks=8, block_size=block)
    # fp32 takes the torch kernel: "auto" computes the matmuls in fp16, whose rounding this
    # test of paging and attention would otherwise have to allow for (Gemma 3's logits exceeded
    # 2e-3 on the H100).
    gpu = LlamaRunner.load(
        checkpoint, device="cuda", dtype=dtype, max_model_len=96, num_blocks=40,
        block_size=block, cuda_graphs=False, kernel="torch" if dtype == "float32" else "auto",
    )  # fmt: skip
    totals = [70, 45, 33]
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, cpu.spec.vocab_size, (n,), generator=gen) for n in totals]
    expected = [cpu.forward_logits(s[None])[0] for s in seqs]
    tables = _shuffled_tables(totals, 40, block, seed=4)
    tolerance = 2e-3 if dtype == "float32" else 6e-2
    done = [0, 0, 0]
    plans = [[(0, 37)], [(0, 20), (1, 30)], [(0, 1), (1, 15), (2, 33)]]
    plans += [[(0, 1), (1, 1), (2, 0)]] * 6 + [[(2, 0), (0, 1)]] * 6
    for plan in plans:
        chunks, rows = [], []
        for i, count in plan:
            count = min(count, totals[i] - done[i])
            if count:
                ids = seqs[i][done[i] : done[i] + count].tolist()
                chunks.append(SeqChunk(ids, done[i], tables[i]))
                rows.append((i, count))
        logits = gpu.execute(chunks).cpu()
        for row, (i, count) in enumerate(rows):
            done[i] += count
            want = expected[i][done[i] - 1]
            torch.testing.assert_close(logits[row], want, rtol=tolerance, atol=tolerance)


def test_graph_decoder_matches_the_eager_step(checkpoint: Path) -> None:
    # Decode-only steps replay the graph of their bucket (padded rows repeat the last one).
    block = 16
    runner = LlamaRunner.load(
        checkpoint, device="cuda", max_model_len=64, num_blocks=24, block_size=block,
        max_num_seqs=5,
    )  # fmt: skip
    if _model_type(checkpoint) in NO_GRAPHS:
        assert runner.graph_decoder is None and runner.ops.name == "torch"
        pytest.skip("soft-capped attention runs eagerly on TorchOps: no CUDA graphs to compare")
    assert runner.graph_decoder is not None and runner.ops.name == "triton"
    gen = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, runner.spec.vocab_size, (5, 40), generator=gen)
    prompt = [7, 12, 3, 20, 9]
    tables = _shuffled_tables([64] * 5, 24, block, seed=5)[:5]
    tables = [t[:4] for t in tables]
    for s in range(5):
        runner.execute([SeqChunk(seqs[s, : prompt[s]].tolist(), 0, tables[s])])
    for batch_seqs in ([3], [0, 4, 1], [4, 3, 2, 1, 0]):
        for _ in range(6):
            chunks = [SeqChunk([int(seqs[s, prompt[s]])], prompt[s], tables[s]) for s in batch_seqs]
            with torch.inference_mode():
                eager = runner.forward_step(build_step_batch(chunks, block, runner.device)).clone()
            graphed = runner.execute(chunks)  # rewrites the same KV rows with the same values
            torch.testing.assert_close(graphed, eager, rtol=5e-2, atol=5e-2)
            prompt = [p + 1 if s in batch_seqs else p for s, p in enumerate(prompt)]
