"""The project store (no Qt, no torch): SQLite state, images, tags, rounds, masks, training runs."""

from defect_studio.project.store import (
    DECIDED_STATES,
    LOCKED_STATES,
    MASK_STATES,
    TAGS,
    ImageRecord,
    MaskRecord,
    Project,
    RoundRecord,
    RunInput,
    TagReview,
    TrainingRun,
)

__all__ = [
    "DECIDED_STATES",
    "LOCKED_STATES",
    "MASK_STATES",
    "TAGS",
    "ImageRecord",
    "MaskRecord",
    "Project",
    "RoundRecord",
    "RunInput",
    "TagReview",
    "TrainingRun",
]
