"""What the pipeline knows of a teacher, wherever it came from."""

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from schemas.features import ImportedTeacherRecord


@dataclass
class Teacher:
    """A task's teacher, in eval mode.

    `network(images)` gives a `ModelOutput` whose `features` hold the distilled taps (`bottleneck`
    and `decoder`) and whose `predictions` hold the task's prediction when the teacher gives one;
    `network.distilled_features(images)` gives the taps alone. `fingerprint` (a sha256) identifies
    the teacher in the feature stores and students made from it; `files` are the files it was
    made from, by params key, which no output may replace."""

    task: str
    network: nn.Module
    fingerprint: str
    files: dict[str, Path]
    predicts: bool = True
    imported: ImportedTeacherRecord | None = None

    @property
    def source(self) -> str:
        """The teacher's file, for messages: its checkpoint, or an imported teacher's weights."""
        return str(next(iter(self.files.values())))
