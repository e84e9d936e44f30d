"""Errors a user can act on. The CLI and the API print their message, never a traceback."""


class CxrError(Exception):
    """Base class: the message names the file (when there is one), what was wrong and what to do."""


class DataError(CxrError):
    """Metadata, split lists or bounding boxes are missing, malformed or inconsistent."""


class ModelError(CxrError):
    """A model or checkpoint cannot be built or loaded (missing weights file, wrong format)."""
