"""Stop strings over a text stream, without leaking any part of one.

Text that could be the start of a stop string is held back until the next delta decides it. A stop
string can only begin inside the held text or the new delta (anything earlier was not a possible
prefix, so it was emitted), so each step looks at O(longest stop string + delta) characters.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a delta; return (text safe to emit, whether a stop string matched).

        On a match the emitted text ends right before the earliest stop string, and the rest of
        the stream must be discarded.
        """
        if not self._stop:
            return text, False
        buffer = self._held + text
        match = self._earliest_match(buffer)
        if match >= 0:
            self._held = ""
            return buffer[:match], True
        hold = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The stream ended without a match: the held text was ordinary text."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, buffer: str) -> int:
        best = -1
        for stop in self._stop:
            index = buffer.find(stop)
            if index >= 0 and (best < 0 or index < best):
                best = index
        return best

    def _longest_stop_prefix_suffix(self, buffer: str) -> int:
        # A full stop string would have matched, so only proper prefixes can be pending.
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-length:]
            if any(stop.startswith(tail) for stop in self._stop):
                return length
        return 0
