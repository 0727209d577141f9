"""The loss history of a run, OUTPUT_DIR/history_rank<N>.json, kept across resumes.

{"train_loss": {step: loss}, "valid_loss": {step: loss}}, written by the reporting rank before every
checkpoint. A resumed run reads it back up to the step of the checkpoint it resumes from (steps an
interrupted run took after that are taken again), so the file always holds the whole run.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class History:
    train_loss: dict = field(default_factory=dict)
    valid_loss: dict = field(default_factory=dict)

    @staticmethod
    def resume(path: Path, step: int) -> "History":
        """The history saved at `path`, up to and including `step` (empty if there is none)."""
        if not path.is_file():
            return History()
        saved = json.loads(path.read_text())
        return History(
            {int(s): v for s, v in saved["train_loss"].items() if int(s) <= step},
            {int(s): v for s, v in saved["valid_loss"].items() if int(s) <= step},
        )

    def save(self, path: Path) -> None:
        """Atomically: a kill while writing leaves the previous file."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"train_loss": self.train_loss, "valid_loss": self.valid_loss}, indent=1) + "\n")
        os.replace(tmp, path)
