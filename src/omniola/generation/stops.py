"""Stop strings on streamed text."""

from __future__ import annotations


class StopTrimmer:
    """Ends streamed text at the first stop string, holding back only what could still begin one.

    `push(piece)` returns the text that is safe to show; `flush()` returns what was held back once the stream ends.
    After a stop string is seen, `stopped` is true and everything else is dropped.

    Example:
        >>> t = StopTrimmer(["</s>"])
        >>> t.push("Hello <"), t.push("/s> tail"), t.stopped
        ('Hello ', '', True)
    """

    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = tuple(stops)
        self.buf = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.buf += piece
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf, self.stopped = self.buf[: min(hits)], "", True
            return out
        keep = self._held_suffix()
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest end of the buffer that is the start of a stop string."""
        for n in range(min(len(self.buf), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = self.buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out
