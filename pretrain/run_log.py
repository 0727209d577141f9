"""The run's log file beside the console: everything a process prints from here on (stdout and
stderr, tracebacks included) is also appended to a file under OUTPUT_DIR, each line stamped with
the time. Appended, so a resumed or requeued job continues the same file."""

import sys
import time
from pathlib import Path


class _Tee:
    def __init__(self, stream, file):
        self.stream = stream
        self.file = file
        self.at_line_start = True

    def write(self, text: str) -> int:
        self.stream.write(text)
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                self.file.write(time.strftime("%Y-%m-%d %H:%M:%S "))
            self.file.write(piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding...: the console's
        return getattr(self.stream, name)


def log_to_file(path: Path) -> None:
    """From now on, this process's output also goes to `path`."""
    file = open(path, "a", buffering=1, encoding="utf-8")
    file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + "python -m pretrain " + " ".join(sys.argv[1:]) + "\n")
    sys.stdout = _Tee(sys.stdout, file)
    sys.stderr = _Tee(sys.stderr, file)
