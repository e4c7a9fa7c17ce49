"""Calibration text: the built-in split, file formats, and the windows drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantize.calib import (
    builtin_corpus,
    calibration_text,
    heldout_text,
    load_calibration_text,
    read_text_file,
    sample_windows,
)
from quantize.errors import UserInputError


def test_builtin_split_is_disjoint_and_covers_the_corpus() -> None:
    calib, held = calibration_text(), heldout_text()
    corpus = builtin_corpus()
    assert corpus.startswith(calib)
    assert len(calib) + len(held) <= len(corpus)
    assert 0.7 < len(calib) / len(corpus) < 0.8 and len(held) > 0.15 * len(corpus)
    # No paragraph of the held-out part appears in the calibration part (the topics repeat some).
    paragraphs = [p for p in held.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 100 and not any(p in calib for p in paragraphs)


def test_text_files(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("hello world")
    assert load_calibration_text(str(txt)) == "hello world"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_text_file(jsonl) == "one\n\ntwo"
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserInputError, match=r"b\.jsonl:2: expected an object"):
        read_text_file(bad)
    other = tmp_path / "a.csv"
    other.write_text("x")
    with pytest.raises(UserInputError, match=r"expected a \.txt or \.jsonl"):
        read_text_file(other)
    with pytest.raises(UserInputError, match="does not exist"):
        load_calibration_text(str(tmp_path / "missing.txt"))


def test_windows_are_seeded_disjoint_and_within_the_text() -> None:
    ids = torch.arange(10_000)
    a = sample_windows(ids, nsamples=16, seqlen=500, seed=3)
    b = sample_windows(ids, nsamples=16, seqlen=500, seed=3)
    c = sample_windows(ids, nsamples=16, seqlen=500, seed=4)
    assert a.shape == (16, 500) and torch.equal(a, b) and not torch.equal(a, c)
    # Each window is a contiguous run of the text, and no token is used twice.
    assert bool((a[:, 1:] - a[:, :-1] == 1).all())
    assert a.flatten().unique().numel() == 16 * 500


def test_too_short_text_says_how_much_is_needed() -> None:
    with pytest.raises(UserInputError, match=r"has 1000 tokens but .* needs 2048") as err:
        sample_windows(torch.arange(1000), nsamples=4, seqlen=512, seed=0)
    assert "at most 1 windows of 512" in str(err.value)
