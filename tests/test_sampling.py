"""Sampler: each penalty's exact effect, top-k/top-p masks against transformers' own warpers,
seeded sampling independent of the batch, min_tokens, raw logprobs, non-finite logits."""

from __future__ import annotations

import math

import pytest
import torch

from gateway.engine.params import SamplingParams
from gateway.engine.sampler import Sampler, filter_top_k_top_p, penalize

VOCAB = 50
EOS = 7


def make_sampler(num_slots: int = 4) -> Sampler:
    return Sampler(num_slots, VOCAB, eos_token_ids=[EOS])


def column(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


# --------------------------------------------------------------------------- penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    counts = torch.zeros(1, 5)
    out = penalize(logits, seen, counts, column(2.0), column(0.0), column(0.0))
    assert out.tolist() == [[1.0, -4.0, 3.0, -1.0, 0.0]]


def test_repetition_penalty_matches_transformers_processor() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    history = torch.tensor([[1, 4, 4, 9], [0, 3, 30, 49]])
    seen = torch.zeros(2, VOCAB, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(penalty=1.3)(history, logits.clone())
    out = penalize(
        logits, seen, torch.zeros(2, VOCAB), column(1.3, 1.3), column(0, 0), column(0, 0)
    )
    torch.testing.assert_close(out, expected)


def test_frequency_and_presence_penalties_follow_openai_formula() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    seen = counts > 0
    out = penalize(logits, seen, counts, column(1.0), column(0.5), column(0.25))
    # logit - count * frequency - (count > 0) * presence
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]]


def test_negative_presence_penalty_encourages_repetition() -> None:
    logits = torch.tensor([[1.0, 1.0]])
    counts = torch.tensor([[0.0, 2.0]])
    out = penalize(logits, counts > 0, counts, column(1.0), column(0.0), column(-1.0))
    assert out.tolist() == [[1.0, 2.0]]


def test_sampler_repetition_penalty_covers_prompt_and_output() -> None:
    sampler = make_sampler()
    # Token 3 is in the prompt; token 5 will be produced. Both start at logit 2.0 vs 1.5 for 6.
    sampler.add(0, SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[3])
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 3] = 3.0  # prompt token: 3 / 2 = 1.5 after penalty
    logits[0, 5] = 2.0
    logits[0, 6] = 1.8
    assert sampler.sample([0], logits).token_ids == [5]
    # 5 is now in the output: 2.0 / 2 = 1.0 < 1.8, so 6 wins; 3 stays penalised at 1.5.
    assert sampler.sample([0], logits).token_ids == [6]


def test_sampler_frequency_penalty_counts_each_output_occurrence() -> None:
    sampler = make_sampler()
    sampler.add(1, SamplingParams(temperature=0, frequency_penalty=0.4), prompt_ids=[5, 5, 5])
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 5] = 2.0
    logits[0, 6] = 1.0
    # Prompt occurrences do not count (OpenAI: penalties over generated text).
    picks = [sampler.sample([1], logits).token_ids[0] for _ in range(4)]
    # 5 scores 2.0, 1.6, 1.2, then 0.8 < 1.0: the fourth pick is 6.
    assert picks == [5, 5, 5, 6]


def test_penalty_state_is_reset_when_a_slot_is_reused() -> None:
    sampler = make_sampler()
    params = SamplingParams(temperature=0, presence_penalty=2.0)
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 9] = 1.0
    logits[0, 8] = 0.5
    sampler.add(0, params, prompt_ids=[1])
    assert sampler.sample([0], logits).token_ids == [9]
    assert sampler.sample([0], logits).token_ids == [8]  # 9 was penalised
    sampler.remove(0)
    sampler.add(0, params, prompt_ids=[1])
    assert sampler.sample([0], logits).token_ids == [9]


# ----------------------------------------------------------------------- top-k / top-p


def test_top_k_keeps_k_best_and_ties_at_the_kth_value() -> None:
    logits = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 3.0, 2.0, 0.0]])
    out = filter_top_k_top_p(logits, [2, 2], [1.0, 1.0])
    assert torch.isfinite(out).tolist() == [
        [True, False, True, True, False],  # the tie at the 2nd value is kept (HF)
        [True, False, True, False, False],
    ]


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_top_k_top_p(logits, [0], [0.75])).tolist() == [
        [True, True, False, False]
    ]
    assert torch.isfinite(filter_top_k_top_p(logits, [0], [0.85])).tolist() == [
        [True, True, True, False]
    ]
    # The most likely token always survives, even for a tiny p.
    assert torch.isfinite(filter_top_k_top_p(logits, [0], [1e-9])).tolist() == [
        [True, False, False, False]
    ]


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.9), (10, 0.7), (1, 0.5)])
def test_masks_match_transformers_warpers(top_k: int, top_p: float) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB) * 3
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    out = filter_top_k_top_p(logits, [top_k] * 3, [top_p] * 3)
    assert torch.equal(torch.isfinite(out), torch.isfinite(expected))


def test_masks_are_per_row() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    out = filter_top_k_top_p(logits, [3, 0, 0], [1.0, 0.5, 1.0])
    kept = torch.isfinite(out).sum(dim=1).tolist()
    assert kept[0] == 3
    assert 1 <= kept[1] < VOCAB
    assert kept[2] == VOCAB
    torch.testing.assert_close(out[2], logits[2])


def test_sampled_tokens_stay_inside_the_top_k_top_p_set() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, VOCAB) * 2
    allowed = set(torch.isfinite(filter_top_k_top_p(logits, [8], [0.6])).nonzero()[:, 1].tolist())
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=1.5, top_k=8, top_p=0.6, seed=11), prompt_ids=[1])
    picks = {sampler.sample([0], logits).token_ids[0] for _ in range(200)}
    assert picks <= allowed
    assert len(picks) > 1


# ------------------------------------------------------------------ sampling behaviour


def test_temperature_zero_is_argmax_and_draws_no_randomness() -> None:
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)
    sampler = make_sampler()
    for slot in range(3):
        sampler.add(slot, SamplingParams(temperature=0.0), prompt_ids=[1])
    assert sampler.sample([0, 1, 2], logits).token_ids == logits.argmax(dim=1).tolist()


def test_sampling_follows_the_softmax_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (VOCAB - 3))
    logits = probs.clamp_min(1e-30).log().unsqueeze(0)
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=1.0, seed=1234), prompt_ids=[1])
    draws = torch.tensor([sampler.sample([0], logits).token_ids[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=VOCAB).float() / len(draws)
    assert set(draws.tolist()) <= {0, 1, 2}
    # Seeded, so deterministic; 3 sigma of a binomial at n=3000 is about 0.027.
    assert abs(freq[0].item() - 0.6) < 0.03
    assert abs(freq[1].item() - 0.3) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    logits = torch.tensor([[2.0, 1.0] + [-30.0] * (VOCAB - 2)])

    def share_of_top(temperature: float) -> float:
        sampler = make_sampler()
        sampler.add(0, SamplingParams(temperature=temperature, seed=5), prompt_ids=[1])
        picks = [sampler.sample([0], logits).token_ids[0] for _ in range(1000)]
        return picks.count(0) / len(picks)

    # p(top) = sigmoid(1 / T): 0.99995 at T=0.1, 0.73 at T=1, 0.62 at T=2
    assert share_of_top(0.1) > 0.99
    assert 0.68 < share_of_top(1.0) < 0.78
    assert 0.57 < share_of_top(2.0) < 0.67


def test_same_seed_same_tokens_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(6)
    steps = [torch.randn(VOCAB) for _ in range(20)]
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=2024)

    alone = make_sampler()
    alone.add(0, params, prompt_ids=[1])
    expected = [alone.sample([0], step.unsqueeze(0)).token_ids[0] for step in steps]

    crowded = make_sampler()
    crowded.add(3, params, prompt_ids=[1])
    crowded.add(0, SamplingParams(temperature=1.0), prompt_ids=[2])  # unseeded neighbour
    crowded.add(1, SamplingParams(temperature=0.7, seed=2024 + 1), prompt_ids=[2])
    crowded.add(2, SamplingParams(temperature=0.0), prompt_ids=[2])
    got = []
    for i, step in enumerate(steps):
        noise = torch.randn(3, VOCAB)
        # The seeded request sits in a different row each step, among different neighbours.
        order = [0, 3, 1, 2] if i % 2 else [1, 2, 3]
        rows = [step if slot == 3 else noise[j % 3] for j, slot in enumerate(order)]
        result = crowded.sample(order, torch.stack(rows))
        got.append(result.token_ids[order.index(3)])
    assert got == expected


def test_different_seeds_differ_and_unseeded_requests_vary() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform

    def run(seed: int | None) -> list[int]:
        sampler = make_sampler()
        sampler.add(0, SamplingParams(temperature=1.0, seed=seed), prompt_ids=[1])
        return [sampler.sample([0], logits).token_ids[0] for _ in range(12)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(None) != run(None)


def test_extreme_seeds_are_accepted() -> None:
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=1.0, seed=2**64 - 1), prompt_ids=[1])
    sampler.add(1, SamplingParams(temperature=1.0, seed=-(2**63)), prompt_ids=[1])
    assert len(sampler.sample([0, 1], torch.zeros(2, VOCAB)).token_ids) == 2


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, EOS] = 5.0
    logits[0, 11] = 4.0
    logits[0, 12] = 3.0
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[11]), [1])
    picks = [sampler.sample([0], logits).token_ids[0] for _ in range(3)]
    assert picks == [12, 12, EOS]


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_model_logprobs_even_with_penalties_and_temperature() -> None:
    torch.manual_seed(7)
    logits = torch.randn(2, VOCAB)
    raw = torch.log_softmax(logits, dim=-1)
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3), [1, 2])
    sampler.add(1, SamplingParams(temperature=0.0), [1])  # no logprobs requested
    result = sampler.sample([0, 1], logits)
    row = result.logprobs[0]
    assert row is not None and result.logprobs[1] is None
    token = result.token_ids[0]
    assert math.isclose(row.logprob, raw[0, token].item(), abs_tol=1e-6)
    values, indices = raw[0].topk(3)
    assert row.top_ids == indices.tolist()
    assert row.top_logprobs == pytest.approx(values.tolist(), abs=1e-6)


def test_logprobs_zero_gives_only_the_chosen_token() -> None:
    sampler = make_sampler()
    sampler.add(0, SamplingParams(temperature=0, logprobs=0), [1])
    row = sampler.sample([0], torch.randn(1, VOCAB)).logprobs[0]
    assert row is not None and row.top_ids == [] and row.logprob <= 0.0


# ----------------------------------------------------------------------- bad logits


def test_non_finite_logits_fail_only_their_row() -> None:
    logits = torch.randn(3, VOCAB)
    logits[1] = float("nan")
    sampler = make_sampler()
    for slot in range(3):
        sampler.add(slot, SamplingParams(temperature=0.8 if slot else 0.0, seed=slot), [1])
    result = sampler.sample([0, 1, 2], logits)
    assert result.errors[0] is None and result.errors[2] is None
    assert result.errors[1] is not None and "non-finite" in result.errors[1]


def test_sampling_an_unregistered_slot_is_an_error() -> None:
    with pytest.raises(KeyError, match="slot 2"):
        make_sampler().sample([2], torch.zeros(1, VOCAB))


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked: candidate fast path; flat: full sort
def test_top_p_on_a_large_vocabulary_matches_transformers(scale: float) -> None:
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(8)
    logits = torch.randn(3, 5000) * scale
    expected = TopPLogitsWarper(0.9)(None, logits[:2].clone())
    out = filter_top_k_top_p(logits, [0, 0, 0], [0.9, 0.9, 1.0])
    assert torch.equal(torch.isfinite(out[:2]), torch.isfinite(expected))
    torch.testing.assert_close(out[2], logits[2])  # top_p=1 row untouched


@pytest.mark.parametrize("scale", [8.0, 0.05])
def test_mixed_rows_on_a_large_vocabulary_match_transformers(scale: float) -> None:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(11)
    logits = torch.randn(4, 5000) * scale
    settings = [(200, 0.9), (0, 0.8), (30, 1.0), (2000, 0.95)]
    out = filter_top_k_top_p(logits, [k for k, _ in settings], [p for _, p in settings])
    for row, (k, p) in enumerate(settings):
        expected = logits[row : row + 1].clone()
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(torch.isfinite(out[row : row + 1]), torch.isfinite(expected)), row


# ------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampler_matches_cpu_semantics() -> None:
    torch.manual_seed(9)
    vocab = 32000
    logits = torch.randn(6, vocab) * 4
    sampler = Sampler(8, vocab, eos_token_ids=[2])
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(temperature=0.9, top_k=20, seed=1),
        SamplingParams(temperature=1.1, top_p=0.8, seed=2),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.0, logprobs=5, min_tokens=3),
    ]
    for slot, p in enumerate(params):
        sampler.add(slot, p, prompt_ids=[1, 5, 9])
    cuda_logits = logits.cuda()
    result = sampler.sample(list(range(6)), cuda_logits)
    assert result.errors == [None] * 6
    assert result.token_ids[0] == int(logits[0].argmax())
    allowed_k = torch.isfinite(filter_top_k_top_p(logits[2:3], [20], [1.0]))[0]
    assert bool(allowed_k[result.token_ids[2]])
    allowed_p = torch.isfinite(filter_top_k_top_p(logits[3:4], [0], [0.8]))[0]
    assert bool(allowed_p[result.token_ids[3]])
    cuda_masks = filter_top_k_top_p(cuda_logits, [20, 0, 7, 0, 0, 0], [1.0, 0.8, 0.5, 1.0, 1, 1])
    cpu_masks = filter_top_k_top_p(logits, [20, 0, 7, 0, 0, 0], [1.0, 0.8, 0.5, 1.0, 1, 1])
    assert torch.equal(torch.isfinite(cuda_masks).cpu(), torch.isfinite(cpu_masks))
    row = result.logprobs[5]
    assert row is not None and len(row.top_ids) == 5
    expected = torch.log_softmax(logits[5].double(), -1)[result.token_ids[5]].item()
    assert math.isclose(row.logprob, expected, abs_tol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_seeded_sampling_is_independent_of_the_batch() -> None:
    torch.manual_seed(10)
    vocab = 32000
    steps = [torch.randn(vocab, device="cuda") for _ in range(16)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=99)
    alone = Sampler(4, vocab, [2])
    alone.add(0, params, [1])
    expected = [alone.sample([0], s[None]).token_ids[0] for s in steps]
    crowd = Sampler(4, vocab, [2])
    crowd.add(2, params, [1])
    crowd.add(0, SamplingParams(temperature=1.0), [1])
    crowd.add(1, SamplingParams(temperature=0.5, seed=5), [1])
    got = []
    for step in steps:
        batch = torch.stack(
            [torch.randn(vocab, device="cuda"), step, torch.randn(vocab, device="cuda")]
        )
        got.append(crowd.sample([0, 2, 1], batch).token_ids[1])
    assert got == expected
