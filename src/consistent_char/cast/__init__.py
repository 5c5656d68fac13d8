"""Casts: many consistent characters at once, one per subject of a prompt set.

- `consistent_char.cast.subjects`: the subjects (a prompt-set file or a built-in set such as
  ConsiStory+) and their run folder names;
- `consistent_char.cast.record`: ``cast.json``, each subject's status and outcome;
- `consistent_char.cast.runner`: `run_cast`, in this process one subject after another;
- `consistent_char.cast.ray_backend`: `RayBackend`, one Ray task per subject (optional Ray).
"""

from consistent_char.cast.record import CAST_FILE, CastRecord, SubjectRecord
from consistent_char.cast.runner import (
    CastEvent,
    SequentialBackend,
    SubjectJob,
    extract_subject,
    plan_cast,
    run_cast,
)
from consistent_char.cast.subjects import (
    BUILTIN_SETS,
    CONSISTORY_PLUS,
    load_subjects,
    prompt_set_from_consistory,
    run_folder_names,
)

__all__ = [
    "BUILTIN_SETS",
    "CAST_FILE",
    "CONSISTORY_PLUS",
    "CastEvent",
    "CastRecord",
    "SequentialBackend",
    "SubjectJob",
    "SubjectRecord",
    "extract_subject",
    "load_subjects",
    "plan_cast",
    "prompt_set_from_consistory",
    "run_cast",
    "run_folder_names",
]
