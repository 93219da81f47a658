"""Stand-ins for the TF-Hub feature-vector models the endpoints name, built offline with random weights.

They are made the way TF-Hub's TF2 image feature-vector SavedModels are (the Reusable SavedModel
API): a callable object, `__call__(images)` with float32 RGB [N, S, S, 3] in [0, 1] of a fixed
size, returning pooled [N, dim] features, with `variables`, `trainable_variables` and
`regularization_losses`. An endpoint names them like a TF-Hub handle (no signature, no output
key), and they load through the service's own `Encoder` (hub.KerasLayer) exactly like one:

- efficientnet_b0: Keras' EfficientNetB0 (1280-d), like tfhub.dev/tensorflow/efficientnet/b0/feature-vector;
- bit_resnet: a compact BiT ResNet-v2 (pre-activation bottlenecks, Group Normalization,
  weight-standardised convolutions; 2048-d), like tfhub.dev/google/bit/m-r50x1, with one block
  per stage instead of 3/4/6/3;
- unconvertible: a small feature-vector model whose graph uses `Svd`, which TFLite's built-in
  ops lack (TensorFlow runs it; conversion with TFLITE_BUILTINS only fails).

The Keras 3 stand-ins are built and saved in a fresh interpreter (`python -m tests.encoders.standins`), as
`service.encoders.offline` does: Keras 3 cannot be imported in a process whose TensorFlow was
imported for tf-keras (TF_USE_LEGACY_KERAS=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.core.config import ROOT
from service.encoders import EncoderSource

INPUT_SIZE = 128  # small inputs keep the forward passes fast; the graphs are the real ones
KERAS_STANDINS = ("efficientnet_b0", "bit_resnet")
UNCONVERTIBLE_SIZE = 64


def source(path: Path, input_size: int = INPUT_SIZE) -> EncoderSource:
    """How an endpoint names a TF-Hub feature-vector model: its `__call__`, no signature or output key."""
    return EncoderSource(kind="saved_model", location=str(path), input_size=input_size)


class Build:
    """Keras 3 stand-ins being exported in a subprocess; `wait` returns their SavedModel folders."""

    def __init__(self, folder: Path, names: tuple[str, ...] = KERAS_STANDINS, size: int = INPUT_SIZE) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.targets = {name: folder / name for name in names}
        self.log = folder / "export.log"
        env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        args = [f"{name}={target}" for name, target in self.targets.items()]
        with self.log.open("wb") as log:  # one interpreter exports them all (one Keras import)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.encoders.standins", str(size), *args],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float = 300) -> dict[str, Path]:
        if self.process.wait(timeout) != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"exporting the stand-ins failed ({self.process.returncode}):\n{tail}")
        for name, target in self.targets.items():
            if not (target / "saved_model.pb").is_file():
                raise RuntimeError(f"stand-in {name} was not exported to {target}")
        return self.targets

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def export(name: str, target: Path, size: int) -> None:
    """Build one stand-in with random weights and save it as a SavedModel (runs in Keras 3)."""
    import keras
    import tensorflow as tf

    if int(keras.__version__.split(".")[0]) < 3:
        raise SystemExit("the stand-ins need Keras 3 (TF_USE_LEGACY_KERAS unset)")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3), name="image")  # RGB in [0, 1], TF-Hub's convention
    if name == "efficientnet_b0":
        # Keras' EfficientNet rescales [0, 255] and normalises inside: feed it [0, 255].
        x = keras.layers.Rescaling(255.0)(inputs)
        backbone = keras.applications.EfficientNetB0(
            include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
        )
        outputs = backbone(x)
    elif name == "bit_resnet":
        outputs = _bit_resnet(keras, inputs)
    else:
        raise SystemExit(f"unknown stand-in {name!r}")
    model = keras.Model(inputs, outputs, name=name)

    # A Reusable SavedModel, as TF-Hub publishes: the model's call and its (TensorFlow) variables.
    # Saving this object rather than `model.export` skips Keras' per-layer tracking (5x faster).
    hub_model = tf.__internal__.tracking.AutoTrackable()
    hub_model.variables = [v.value for v in model.variables]
    hub_model.trainable_variables = [v.value for v in model.trainable_variables]
    hub_model.regularization_losses = []

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
    def call(images: Any) -> Any:
        return model(images, training=False)

    hub_model.__call__ = call
    tf.saved_model.save(
        hub_model,
        str(target),
        signatures={"serving_default": call},
        options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
    )


def _bit_resnet(keras: Any, inputs: Any) -> Any:
    """BiT's ResNet-v2: input scaled to [-1, 1], a 7x7 root, pre-activation bottleneck blocks with
    GroupNorm(32) and weight-standardised convolutions, GroupNorm + ReLU + global average pooling."""
    ops, layers = keras.ops, keras.layers

    class StandardizedConv2D(layers.Conv2D):
        """Conv2D whose kernel is standardised per output channel on every call (BiT's WS)."""

        def call(self, inputs: Any) -> Any:
            kernel = self.kernel
            mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
            var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
            outputs = self.convolution_op(inputs, (kernel - mean) / ops.sqrt(var + 1e-10))
            if self.use_bias:
                outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, -1)))
            return outputs

    def conv(filters: int, kernel: int, stride: int = 1) -> Any:
        return StandardizedConv2D(filters, kernel, strides=stride, padding="same", use_bias=False)

    def norm_relu(x: Any) -> Any:
        return layers.ReLU()(layers.GroupNormalization(groups=32, epsilon=1e-5)(x))

    def block(x: Any, mid: int, stride: int) -> Any:
        out = 4 * mid
        preact = norm_relu(x)
        shortcut = x
        if stride != 1 or x.shape[-1] != out:
            shortcut = conv(out, 1, stride)(preact)  # projection from the pre-activation
        y = conv(mid, 1)(preact)
        y = conv(mid, 3, stride)(norm_relu(y))
        y = conv(out, 1)(norm_relu(y))
        return layers.Add()([y, shortcut])

    x = layers.Rescaling(2.0, offset=-1.0)(inputs)  # BiT takes [0, 1] and works in [-1, 1]
    x = conv(64, 7, 2)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    for mid, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):  # r50x1's widths, one block each
        x = block(x, mid, stride)
    return layers.GlobalAveragePooling2D()(norm_relu(x))


def unconvertible(target: Path, size: int = UNCONVERTIBLE_SIZE) -> EncoderSource:
    """Save a feature-vector model that TensorFlow runs but TFLite's built-in ops cannot express:
    pooled colour features projected to 16 channels, described by their singular values (Svd)."""
    from service.encoders import tfruntime

    tf = tfruntime.tensorflow()
    cells = (size // 8) ** 2

    class Spectral(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([3, 16], seed=[3, 4]))

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, x: Any) -> Any:
            grid = tf.nn.avg_pool2d(x, ksize=8, strides=8, padding="VALID")  # [N, S/8, S/8, 3]
            features = tf.matmul(tf.reshape(grid, [-1, cells, 3]) - 0.5, self.w)  # [N, cells, 16]
            return tf.linalg.svd(features, compute_uv=False)  # [N, 16]

    tf.saved_model.save(Spectral(), str(target))
    return EncoderSource("saved_model", str(target), size)


if __name__ == "__main__":
    for item in sys.argv[2:]:
        standin, _, path = item.partition("=")
        export(standin, Path(path), int(sys.argv[1]))
