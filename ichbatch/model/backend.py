"""The Keras backend, imported once and quietly: TensorFlow's start-up notices (absl, oneDNN) reach the
terminal only when -vv asks for library messages."""

from __future__ import annotations

from ..logs import library_noise_wanted, quiet_stderr

_imported = False


def import_backend() -> str:
    """Import Keras and its backend package; returns the backend's name."""
    global _imported
    with quiet_stderr(enabled=not _imported and not library_noise_wanted()):
        import keras

        name = keras.backend.backend()
        if not _imported and name == "tensorflow":
            import tensorflow  # noqa: F401  (its import prints the notices)
        elif not _imported and name == "jax":
            import jax  # noqa: F401
    _imported = True
    return name
