"""The progress line of `tokenize`: documents/s, tokens/s, MB/s of input and the time left."""

import sys
import time

# A terminal gets the line rewritten in place every second; a log file a new line every 30 s.
EVERY_SECONDS_TERMINAL = 1.0
EVERY_SECONDS_LOG = 30.0


class Progress:
    def __init__(self, total_bytes: int, stream=None):
        self.total_bytes = max(total_bytes, 1)
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.every_seconds = EVERY_SECONDS_TERMINAL if self.interactive else EVERY_SECONDS_LOG
        self.start = self.last_print = time.monotonic()
        self.documents = self.tokens = self.bytes = 0
        self.skipped_bytes = 0  # inputs whose outputs were complete already (--resume)

    def update(self, documents: int, tokens: int, input_bytes: int):
        self.documents += documents
        self.tokens += tokens
        self.bytes += input_bytes
        now = time.monotonic()
        if now - self.last_print >= self.every_seconds:
            self.last_print = now
            self._print(end="\r" if self.interactive else "\n")

    def skip_bytes(self, input_bytes: int):
        self.skipped_bytes += input_bytes

    def done(self):
        if self.documents:
            self._print(end="\n")

    @property
    def seconds(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        seconds = self.seconds
        to_do = self.total_bytes - self.skipped_bytes
        fraction = min(self.bytes / max(to_do, 1), 1.0)
        eta = seconds * (1 - fraction) / fraction if fraction > 0 else float("nan")
        return (
            f"tokenize {100 * fraction:5.1f}% | {self.documents:,} docs {self.documents / seconds:,.0f}/s"
            f" | {self.tokens / 1e6:,.1f}M tokens {self.tokens / seconds / 1e6:,.2f}M/s"
            f" | {self.bytes / seconds / 1e6:,.1f} MB/s | {_clock(seconds)} elapsed, ETA {_clock(eta)}"
        )

    def _print(self, end: str):
        print(self.line(), end=end, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
