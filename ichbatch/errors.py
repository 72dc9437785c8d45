"""Domain exceptions. Messages name the file, UID or bundle and, where there is one, the fix.

The CLI turns these into click errors; pipeline code turns per-file and per-study ones into statuses.
"""


class IchBatchError(Exception):
    """Base class for every error ichbatch raises on purpose."""


class NotDicomError(IchBatchError):
    """A file is not DICOM (no preamble and no parsable header)."""


class DicomReadError(IchBatchError):
    """A DICOM file could not be parsed (truncated, corrupt)."""


class DecodeError(IchBatchError):
    """Pixel data could not be decoded, or decoded to values that cannot be CT."""


class SeriesSelectionError(IchBatchError):
    """A study has no usable axial CT series."""


class BundleError(IchBatchError):
    """A model bundle is missing, corrupt, unsafe or does not match its card."""


class OutputError(IchBatchError):
    """An output could not be written (unwritable folder, full disk)."""


class DiskFullError(OutputError):
    """No space left (or quota reached) where outputs go: wait and retry, it is nobody's study's fault."""


class OutputLockedError(IchBatchError):
    """Another ichbatch process is writing the same results; a second writer is refused (a usage error)."""


class ExistingFileError(IchBatchError):
    """An output path holds a file ichbatch did not write; it is never overwritten (a usage error)."""


class ClusterError(IchBatchError):
    """The Ray cluster cannot be reached or cannot run the model (not one study's fault)."""
