"""Class-activation maps, batched, at a chosen convolutional layer.

Two methods (a card's `cam_method`), both from the features A and the gradients dy/dA at the layer:
- "gradcam" (Selvaraju et al. 2017): sum_k mean_xy(dy/dA_k) * A_k, each channel weighted by its mean
  gradient. Good at the last layers; at shallow ones the channel means mix in features from the whole
  slice, and the map follows anatomy rather than the lesion.
- "hirescam" (Draelos & Carin 2020): sum_k dy/dA_k * A_k element-wise, so a position counts only as far
  as the score depends on it there. That keeps shallow layers' maps on the evidence, and their finer
  grid resolves thin lesions (subarachnoid, layering intraventricular) that a stride-8 map cannot.

At the last convolutional layer of a GAP -> Dense head both equal the class activation map: the
features weighted by the dense kernel's column for the label (the gradient there is that column, the
same at every position, times the sigmoid's derivative, a positive factor per image that the per-map
normalisation removes). That needs no gradients and is backend-neutral. At any other layer (a card's
`cam_layer`, for finer maps) or with other heads the backend's autodiff (TensorFlow or JAX) is needed.

Upsampling puts each feature cell where its receptive field is centred. Keras' ResNets pad explicitly
and then stride with 'valid' convolutions, so cell j of a stride-s map is centred on input pixel s*j,
not s*(j + 0.5) as a plain image resize assumes: half a cell (16 px at stride 32) of difference.

A card's `cam_augment` (e.g. hflip, vflip) averages the map over flipped copies of the image, each map
flipped back ("augmented Grad-CAM"): a network trained on flipped images may put its evidence on either
side of a lesion, and the average of the two sides lands on the lesion itself.

The maps run on a copy of the network with its batch normalisations folded into the convolutions
(folding.py): the same function, without a normalisation's forward and backward passes per layer.
Under TensorFlow in float32 the features-and-gradients call is compiled by XLA: on a 2-core AVX2 CPU
a flagged study's maps took 0.61 of the wall time of a plain graph (README: Performance). JAX always
compiles with XLA.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from .backend import forward, variable_values
from .folding import fold_batchnorm

log = logging.getLogger(__name__)

# View name -> the image axes it flips ((B, H, W, C) arrays: 1 is vertical, 2 is horizontal).
FLIPS: dict[str, tuple[int, ...]] = {"hflip": (2,), "vflip": (1,), "hvflip": (1, 2)}
METHODS = ("gradcam", "hirescam")
NAMES = {"gradcam": "Grad-CAM", "hirescam": "HiResCAM"}


class CamExplainer:
    """Heat maps in [0, 1] at the model's input size, for any output of the model."""

    def __init__(self, model, layer: str | None = None, augment: tuple[str, ...] = (), method: str = "gradcam",  # type: ignore[no-untyped-def]
                 fold: bool = True, xla: bool | None = None) -> None:
        """fold=False keeps the batch normalisations as they are (benchmarks/heatmap_cost.py compares).
        xla: compile the TensorFlow gradient call with XLA; None: where the model computes in float32
        (XLA's CPU code for bfloat16 was not measured against TensorFlow's native bfloat16 kernels)."""
        import keras

        unknown = [a for a in augment if a not in FLIPS]
        if unknown:
            raise ValueError(f"unknown Grad-CAM augmentation(s) {unknown}; expected some of {sorted(FLIPS)}")
        if method not in METHODS:
            raise ValueError(f"unknown class-activation method {method!r}; expected one of {list(METHODS)}")
        self.model = model
        self.augment = tuple(augment)
        self.method = method
        gap, head = _gap_dense_head(model)
        self.layer = layer or _last_conv_layer(model).name
        target = model.get_layer(self.layer).output
        if gap is not None and target is gap.input:
            self.mode = "cam"
            self.kernel = keras.ops.convert_to_numpy(head.kernel).astype(np.float32)
        else:
            self.mode = "gradcam"
        # The two halves around the layer are built on first use, from a copy with the batch normalisations
        # folded into their convolutions (the same function, a fifth less CPU time per map): a run whose
        # studies are never flagged never pays for the copy.
        self._parts: tuple | None = None  # type: ignore[type-arg]
        self._building = threading.Lock()
        self.fold = fold
        self.xla = xla if xla is not None else str(getattr(model, "compute_dtype", "float32")) == "float32"
        self._grad_fns: dict[str, object] = {}  # the compiled features-and-gradients call, once made
        self._padded: FixedBatches | None = None  # the compiled call padded to a few batch sizes, if any
        # Keras' ResNets pad explicitly ("conv1_pad") and then use 'valid' strided convolutions.
        self.corner_aligned = any(layer.name == "conv1_pad" for layer in model.layers)

    def _split(self) -> tuple:  # type: ignore[type-arg]
        """(input -> the layer's features, the layer's features -> outputs, the first one compiled)."""
        with self._building:
            if self._parts is None:
                import keras

                net = fold_batchnorm(self.model, keep=(self.layer,)) if self.fold else self.model
                target = net.get_layer(self.layer).output
                lower = keras.Model(net.inputs[0], target)
                upper = keras.Model(target, net.outputs[0])
                features = forward(lower)
                if self.mode == "gradcam":  # made once, here under the lock: studies may be finished side by side
                    fn = self._grad_fns["fn"] = _compile_feats_and_grads(lower, upper, self.xla)
                    self._padded = fn if isinstance(fn, FixedBatches) else None
                elif keras.backend.backend() == "jax":  # jax.jit compiles per batch size: a few sizes only
                    padded = self._padded = FixedBatches(lambda x, whole=features: [whole(x)])

                    def features(x):  # type: ignore[no-untyped-def]
                        return padded(x)[0]
                self._parts = (lower, upper, features)
                self.model = net  # the explainer no longer needs the unfolded original
            return self._parts

    @property
    def lower(self):  # type: ignore[no-untyped-def]
        return self._split()[0]

    @property
    def upper(self):  # type: ignore[no-untyped-def]
        return self._split()[1]

    @property
    def padded(self) -> FixedBatches | None:
        """The compiled call whose batches are padded to a few sizes, once a first map has made it (under
        JAX, and TensorFlow with XLA); None otherwise."""
        return self._padded

    def describe(self) -> str:
        """What the maps are, for report captions: e.g. 'HiResCAM at pool1_pool, averaged over hflip, vflip'."""
        text = f"{NAMES[self.method]} at {self.layer}" if self.mode == "gradcam" else f"CAM at {self.layer}"
        return text + (f", averaged over {', '.join(self.augment)}" if self.augment else "")

    def maps(self, images: np.ndarray, output_index: int) -> np.ndarray:
        """images (B, S, S, 3) float in [0, 1] -> (B, S, S) maps in [0, 1], averaged over the card's flips."""
        if not self.augment:
            return self._maps(images, output_index)
        axes = [()] + [FLIPS[a] for a in self.augment]
        views = np.concatenate([np.flip(images, ax) if ax else images for ax in axes])  # one batch: one call
        maps = self._maps(views, output_index).reshape(len(axes), *images.shape[:3])
        # maps are (B, H, W): the same axis numbers flip them back.
        mean = np.mean([np.flip(m, ax) if ax else m for m, ax in zip(maps, axes)], axis=0)
        peak = mean.max(axis=(1, 2), keepdims=True)
        return mean / np.where(peak > 0, peak, 1.0)

    def _maps(self, images: np.ndarray, output_index: int) -> np.ndarray:
        if self.mode == "cam":
            feats = np.asarray(self._split()[2](images), np.float32)
            raw = feats @ self.kernel[:, output_index]
        else:
            raw = cam_raw(self.lower, self.upper, images, output_index, self.method, self._grad_fns)
        return self._finish(raw, images.shape[1])

    def gradcam(self, images: np.ndarray, output_index: int) -> np.ndarray:
        """The gradient method at the same layer regardless of head (checks the CAM shortcut)."""
        raw = cam_raw(self.lower, self.upper, images, output_index, self.method, self._grad_fns)
        return self._finish(raw, images.shape[1])

    def _finish(self, raw: np.ndarray, size: int) -> np.ndarray:
        return normalise_and_upsample(raw, size, self.corner_aligned)


def _gap_dense_head(model):  # type: ignore[no-untyped-def]
    import keras

    layers = model.layers
    if len(layers) >= 2 and isinstance(layers[-1], keras.layers.Dense) and isinstance(
        layers[-2], keras.layers.GlobalAveragePooling2D
    ):
        return layers[-2], layers[-1]
    return None, None


def _last_conv_layer(model):  # type: ignore[no-untyped-def]
    for layer in reversed(model.layers):
        output = getattr(layer, "output", None)
        if output is not None and len(output.shape) == 4:
            return layer
    raise ValueError("model has no layer with a 4-D (convolutional) output for Grad-CAM")


def cam_raw(lower, upper, images: np.ndarray, output_index: int, method: str = "gradcam",  # type: ignore[no-untyped-def]
            cache: dict | None = None) -> np.ndarray:
    """Per image, at the layer's resolution (ReLU comes later): sum_k (mean of dy_c/dA_k) * A_k for
    gradcam, sum_k dy_c/dA_k * A_k position by position for hirescam."""
    feats, grads = features_and_grads(lower, upper, images, output_index, cache)
    if method == "hirescam":
        return np.einsum("bhwc,bhwc->bhw", feats, grads)
    return np.einsum("bhwc,bc->bhw", feats, grads.mean(axis=(1, 2)))


def features_and_grads(lower, upper, images: np.ndarray, output_index: int,  # type: ignore[no-untyped-def]
                       cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The layer's features A and d sum_b y_c / dA, in one compiled call of the backend's autodiff, kept
    in `cache` (one per explainer). The output is chosen by a one-hot weight passed in, not baked in: one
    compiled function serves every label. Run op by op, or traced again per label, the heat maps cost
    more than the whole study's scoring on a CPU."""
    cache = {} if cache is None else cache
    if "fn" not in cache:
        cache["fn"] = _compile_feats_and_grads(lower, upper)
    weights = np.zeros(int(upper.outputs[0].shape[-1]), np.float32)
    weights[output_index] = 1.0
    feats, grads = cache["fn"](np.asarray(images, np.float32), weights)
    return np.asarray(feats, np.float32), np.asarray(grads, np.float32)


def _compile_feats_and_grads(lower, upper, xla: bool = False):  # type: ignore[no-untyped-def]
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def both(x, weights):  # type: ignore[no-untyped-def]
            feats = lower(x, training=False)
            with tf.GradientTape() as tape:
                tape.watch(feats)
                score = tf.reduce_sum(upper(feats, training=False) * weights)
            return feats, tape.gradient(score, feats)

        graph = tf.function(both, reduce_retracing=True)
        compiled = tf.function(both, reduce_retracing=True, jit_compile=True) if xla else None

        def call_tf(x, w):  # type: ignore[no-untyped-def]
            nonlocal compiled
            x, w = tf.convert_to_tensor(x), tf.convert_to_tensor(w)
            if compiled is not None:
                try:
                    return [t.numpy() for t in compiled(x, w)]
                except Exception:  # a model with an op XLA cannot compile: its maps as a plain graph
                    log.warning("XLA could not compile the heat maps' call; it runs as a TensorFlow graph",
                                exc_info=True)
                    compiled = None
            return [t.numpy() for t in graph(x, w)]

        return FixedBatches(call_tf) if xla else call_tf
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        # Stateless calls with the weights as arguments, as in backend.forward: the values are read at each
        # call, and no buffer is donated away from the predictor that shares these layers.
        @jax.jit
        def both_jax(lv, uv, x, w):  # type: ignore[no-untyped-def]
            feats, _ = lower.stateless_call(lv[0], lv[1], x, training=False)

            def score(f):  # type: ignore[no-untyped-def]
                out, _ = upper.stateless_call(uv[0], uv[1], f, training=False)
                return jnp.sum(out * w)

            return feats, jax.grad(score)(feats)

        return FixedBatches(lambda x, w: both_jax(variable_values(lower), variable_values(upper), x, w))
    raise NotImplementedError(f"gradient Grad-CAM is not implemented for the {backend} backend")


class FixedBatches:
    """Calls with the batch padded to the first call's size times 1, 2, 3, 4, 6, 8, 12, ... (powers of
    two and three times them: at most a third of a call is padding). XLA (TensorFlow's jit_compile, and
    jax.jit) compiles once per input shape, 3-5 s on two cores: a study with fewer key slices than the
    first would pay that again, and groups of studies finished together (1 to 8) would pay it for every
    size instead of six times."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        self.fn = fn
        self.step = 0
        self.sizes: set[int] = set()  # the batch sizes it was called with: one compilation each
        self._lock = threading.Lock()  # studies may be finished side by side

    def __call__(self, x: np.ndarray, *rest: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            self.step = self.step or len(x)
        n = len(x)
        padded = self.step * _few_sizes(-(-n // self.step))
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
        self.sizes.add(padded)
        # Each image's features and gradients are its own (inference: no batch statistics), so the
        # padding's rows are dropped and change nothing.
        return [np.asarray(t)[:n] for t in self.fn(x, *rest)]


def _few_sizes(m: int) -> int:
    """The least of 1, 2, 3, 4, 6, 8, 12, 16, ... that is at least m."""
    power = 1 << (m - 1).bit_length()
    return power * 3 // 4 if power >= 4 and power * 3 // 4 >= m else power


def normalise_and_upsample(raw: np.ndarray, size: int, corner_aligned: bool) -> np.ndarray:
    """(B, h, w) raw maps -> (B, size, size) in [0, 1]: ReLU, divide by the peak, bicubic upsampling with
    cell j centred on pixel s*j (corner_aligned) or s*(j + 0.5) - 0.5 (a plain resize)."""
    import cv2

    raw = np.maximum(np.asarray(raw, np.float32), 0)
    out = np.empty((raw.shape[0], size, size), np.float32)
    for i, m in enumerate(raw):
        top = float(m.max())
        m = m / top if top > 0 else m
        stride = size / m.shape[0]
        shift = 0.0 if corner_aligned else stride / 2 - 0.5
        # Forward map: feature cell j lands on output pixel stride * j + shift.
        matrix = np.array([[stride, 0, shift], [0, stride, shift]], np.float32)
        out[i] = cv2.warpAffine(m, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return np.clip(out, 0, 1)


def overlay(gray_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Brain-window slice (uint8) with a heat map (any size, [0, 1]) as a JET overlay -> RGB uint8.

    The colour says the value on a fixed 0-1 scale; the blend is the same wherever the map is above 0.1
    (fading out below, so the slice is not tinted where there is nothing), so a low map shows as blue,
    not as a faint copy of a high one."""
    import cv2

    heat = cv2.resize(heat.astype(np.float32), gray_u8.shape[::-1], interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    base = cv2.cvtColor(gray_u8, cv2.COLOR_GRAY2RGB)
    weight = (alpha * np.clip(heat / 0.1, 0, 1)).astype(np.float32)
    # base * (1 - w) + colour * w, per pixel, in one pass (a float64 blend of a 512x512 RGB image cost more
    # than the key slice's heat map).
    return cv2.blendLinear(base, colour, 1.0 - weight, weight)
