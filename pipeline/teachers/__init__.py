"""The teachers kdmtl distils, whatever made them: its own trained checkpoints (`trained`) or any
torch module built by a user's factory (`imported`). Extraction, verification, online
distillation and evaluation see both as a `Teacher`."""

from pipeline.teachers.base import Teacher
from pipeline.teachers.imported import import_teacher, imported_fingerprint, imported_record
from pipeline.teachers.trained import trained_teacher

__all__ = [
    "Teacher",
    "import_teacher",
    "imported_fingerprint",
    "imported_record",
    "trained_teacher",
]
