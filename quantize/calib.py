"""Calibration and evaluation text, and the calibration windows drawn from it.

The built-in corpus is CPython's documentation topics (`pydoc_data.topics`, PSF licence), present
in every Python install, so the default path downloads nothing. It is split once into a calibration
part (the first ~75%) and a held-out part (the rest), cut at a paragraph break so they never share
text (paragraphs the topics repeat are dropped from the held-out part): quantizing on one and
measuring perplexity on the other is a fair test.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from quantize.errors import UserInputError

CALIBRATION_FRACTION = 0.75
# --nsamples when not given: capped at what the calibration text holds (see fit_windows).
DEFAULT_NSAMPLES = 128
HUB_DATASETS = ("c4", "wikitext2")


@lru_cache(maxsize=1)
def builtin_corpus() -> str:
    """All pydoc topics, joined in sorted key order so the text is the same on every machine."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@lru_cache(maxsize=1)
def _split_point() -> int:
    text = builtin_corpus()
    target = int(len(text) * CALIBRATION_FRACTION)
    cut = text.find("\n\n", target)
    return cut if cut != -1 else target


def calibration_text() -> str:
    """The built-in calibration part: never overlaps `heldout_text()`."""
    return builtin_corpus()[: _split_point()]


@lru_cache(maxsize=1)
def heldout_text() -> str:
    """The built-in held-out part, for perplexity.

    The topics repeat some passages (a grammar rule quoted under two topics, say), so paragraphs
    that also occur in the calibration part are dropped: held-out text is text never calibrated on.
    """
    seen = set(calibration_text().split("\n\n"))
    tail = builtin_corpus()[_split_point() :].lstrip("\n")
    return "\n\n".join(p for p in tail.split("\n\n") if p not in seen)


def read_text_file(path: str | Path) -> str:
    """A .txt file as is, or a .jsonl file's "text" fields joined by blank lines."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"text file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"text file {str(p)!r} is not UTF-8: {exc}") from None
    if suffix == ".txt":
        return raw
    if suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserInputError(f'{p}:{lineno}: expected an object with a string "text" field')
            texts.append(record["text"])
        return "\n\n".join(texts)
    raise UserInputError(f"text file {str(p)!r}: expected a .txt or .jsonl file")


def _hub_text(name: str) -> str:
    """C4 or WikiText-2 from the Hugging Face hub: only for users who are online."""
    try:
        import datasets
    except ImportError:
        raise UserInputError(
            f"--calib {name} needs the 'datasets' package (pip install datasets) and network "
            "access; or pass a .txt/.jsonl file, or leave --calib out for the built-in text"
        ) from None
    try:
        if name == "wikitext2":
            data = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            return "\n\n".join(t for t in data["text"] if t.strip())
        data = datasets.load_dataset(
            "allenai/c4", data_files="en/c4-train.00000-of-01024.json.gz", split="train"
        )
        return "\n\n".join(data.select(range(min(len(data), 20000)))["text"])
    except Exception as exc:  # network, hub or cache errors all mean the same to the user
        raise UserInputError(f"could not load --calib {name} from the hub: {exc}") from None


def load_calibration_text(spec: str | None) -> str:
    """The text named by --calib: None for the built-in part, c4/wikitext2, or a file path."""
    if spec is None:
        return calibration_text()
    if spec in HUB_DATASETS:
        return _hub_text(spec)
    return read_text_file(spec)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` non-overlapping windows of `seqlen` tokens at random offsets: [nsamples, seqlen].

    The offsets are uniform over all non-overlapping placements (the slack is split into random
    gaps), so every part of the text can be drawn and the result depends only on the seed.
    """
    if nsamples < 1 or seqlen < 2:
        raise UserInputError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    total = int(token_ids.numel())
    needed = nsamples * seqlen
    if total < needed:
        raise UserInputError(
            f"calibration text is too short: it has {total} tokens but --nsamples {nsamples} x "
            f"--seqlen {seqlen} needs {needed}; pass a longer --calib file or lower "
            f"--nsamples/--seqlen (at most {total // seqlen} windows of {seqlen} fit)"
        )
    generator = torch.Generator().manual_seed(seed)
    slack = total - needed
    cuts = torch.sort(torch.randint(0, slack + 1, (nsamples,), generator=generator)).values
    starts = cuts + torch.arange(nsamples) * seqlen
    order = torch.randperm(nsamples, generator=generator)
    index = starts[order].unsqueeze(1) + torch.arange(seqlen).unsqueeze(0)
    return token_ids[index]


def fit_windows(total_tokens: int, nsamples: int | None, seqlen: int) -> tuple[int, str | None]:
    """How many windows to draw, and a warning when the default had to be capped.

    With `nsamples` None (the user did not choose) the default is lowered to what the text holds,
    so the built-in corpus (~85k SmolLM2 tokens) works offline at --seqlen 2048; an explicit
    count that does not fit is refused by `sample_windows` instead of silently lowered.
    """
    if nsamples is not None:
        return nsamples, None
    fit = total_tokens // seqlen if seqlen >= 2 else 0
    if fit < 1:
        raise UserInputError(
            f"calibration text is too short: it has {total_tokens} tokens, less than one "
            f"--seqlen {seqlen} window; pass a lower --seqlen or a longer --calib file"
        )
    if fit >= DEFAULT_NSAMPLES:
        return DEFAULT_NSAMPLES, None
    return fit, (
        f"the calibration text has {total_tokens} tokens: {fit} windows of {seqlen} fit, not the "
        f"default {DEFAULT_NSAMPLES}; calibrating on {fit} (pass --calib with a longer text, "
        "e.g. --calib c4 when online, or a lower --seqlen, for more)"
    )
