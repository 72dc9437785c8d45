"""The Keras backend, imported once and quietly: TensorFlow's start-up notices (absl, oneDNN) reach the
terminal only when -vv asks for library messages."""

from __future__ import annotations

import os

from ..config import cache_dir
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
            import jax

            _keep_compilations(jax)
    _imported = True
    return name


def _keep_compilations(jax) -> None:  # type: ignore[no-untyped-def]
    """jax.jit compiles the model and the heat maps' few batch sizes anew in every process: on a GPU lease
    the first pass, which compiled them (and started the workers), went at 19 slices/s, the next at
    2,360. JAX's persistent cache keeps the programs under $ICHBATCH_CACHE/jax for the next run (or
    watch after a restart), at most 2 GB, the least recently used dropped first. Not where the user
    chose JAX's own cache folder, nor with ICHBATCH_JAX_CACHE=0."""
    if jax.config.jax_compilation_cache_dir or os.environ.get("ICHBATCH_JAX_CACHE") == "0":
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)


def forward(model):  # type: ignore[no-untyped-def]
    """x -> model(x) for inference. Under JAX one jit-compiled stateless call: predict_on_batch re-enters
    Keras' training-loop machinery on every call (on a GPU that overhead is several times a ResNet50
    forward pass), and it donates the variables' buffers to its step and stores new ones, which breaks
    any other model sharing those layers, such as the heat maps' while the predictor runs. Elsewhere
    predict_on_batch."""
    import keras

    if keras.backend.backend() != "jax":
        return model.predict_on_batch
    import jax

    @jax.jit
    def call(tv, ntv, x):  # type: ignore[no-untyped-def]
        out, _ = model.stateless_call(tv, ntv, x, training=False)
        return out

    # The values are read at every call, not captured once: training or loading weights replaces them.
    return lambda x: call(*variable_values(model), x)


def variable_values(model):  # type: ignore[no-untyped-def]
    """(trainable, non-trainable) variable values, the arguments a stateless call takes."""
    return [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
