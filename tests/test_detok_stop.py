"""Stop strings over a stream of text deltas: never leaked, even split across deltas."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.stop import StopStringMatcher


def feed_all(stops: list[str], deltas: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out: list[str] = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        out.append(text)
        if matched:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_string_split_across_deltas_is_never_emitted() -> None:
    out, matched = feed_all(["</answer>"], ["The answer is 4", "</ans", "wer>", " trailing"])
    assert matched
    assert out == ["The answer is 4", "", ""]


def test_held_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    out, matched = feed_all(["STOP"], ["go ST", "OP? no: STO", "RE"])
    assert matched
    assert "".join(out) == "go "

    out, matched = feed_all(["STOP"], ["a ST", "x", "ST"])
    assert not matched
    assert out == ["a ", "STx", "", "ST"]  # the final "ST" comes out at flush


def test_earliest_of_several_stop_strings_wins() -> None:
    out, matched = feed_all(["world", "lo w"], ["hello world"])
    assert matched and out == ["hel"]


def test_the_first_stop_string_to_complete_ends_the_stream() -> None:
    # "<" completes before the longer "/<>" could; the "/" was never part of a stop string.
    out, matched = feed_all(["<", "/<>"], ["/", "<", ">"])
    assert matched and "".join(out) == "/"


def test_stop_string_inside_one_delta_cuts_the_rest() -> None:
    out, matched = feed_all(["\n\n"], ["line one\n\nline two"])
    assert matched and out == ["line one"]


def test_no_stop_strings_is_a_pass_through() -> None:
    out, matched = feed_all([], ["a", "b"])
    assert not matched and out == ["a", "b", ""]


def test_overlapping_prefixes_hold_the_longest_candidate() -> None:
    matcher = StopStringMatcher(["abab"])
    assert matcher.feed("xaba") == ("x", False)
    assert matcher.held == "aba"
    assert matcher.feed("b") == ("", True)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>/ ", max_size=40),
    stops=st.lists(st.text(alphabet="ab<>/", min_size=1, max_size=5), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_any_split_gives_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in itertools.pairwise(points)]
    out, matched = feed_all(stops, deltas)
    # The stream stops at the first delta after which some stop string is complete, and cuts
    # at the earliest stop string found in the text so far.
    first = -1
    for end in points[1:]:
        starts = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if starts:
            first = min(starts)
            break
    expected = text if first < 0 else text[:first]
    assert "".join(out) == expected
    assert matched == (first >= 0)
    emitted = ""
    for piece in out:
        emitted += piece
        assert not any(s in emitted for s in stops)  # nothing of a stop string ever leaks
