"""Errors whose message is meant for the user: the CLI prints it, the GUI shows it in a dialog."""


class DefectStudioError(Exception):
    """A problem the user can act on. `str(error)` is the whole message; no traceback is shown."""

    exit_code = 2


class BadImageError(DefectStudioError):
    """An image file that cannot be read, or that the tool refuses (too large, wrong kind)."""


class DataError(DefectStudioError):
    """The data cannot support the operation asked for (empty folder, one class only...)."""


class ProjectError(DefectStudioError):
    """The project folder is missing, damaged, or of a newer schema than this version knows."""


class ProjectLockedError(ProjectError):
    """Another live process holds the project."""

    exit_code = 3


class ModelError(DefectStudioError):
    """A checkpoint or exported model that does not match what is expected."""


class ConfigError(DataError):
    """A setting the user gave that the tool does not have, or a value it refuses (classifier, segmenter,
    CAM and pseudo-label settings alike)."""
