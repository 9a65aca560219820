"""One side panel per stage: Tag, Train, CAMs, Review, Rounds (export is a dialog)."""
