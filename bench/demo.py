"""Demo data made offline from real images: scikit-image's sample photos and Fashion-MNIST.

`photos_zip` : ~18 real photos (astronaut, coffee, rocket...), each with crops and a mirror
               image, in one folder per photo (the label), with a metadata.csv.
`fashion_zip`: Fashion-MNIST images (Debian package dataset-fashion-mnist), one folder per class.

`python -m bench.demo` (`make demo`) trains every endpoint that serves nothing yet on them. It lives
here, not in service/, because scikit-image is a development requirement: Elastic Beanstalk
installs requirements.txt only.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "moon",
    "coins",
    "clock",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "cell",
)


def photo(name: str) -> Image.Image:
    """One of scikit-image's bundled sample photos, as an RGB image."""
    from skimage import data

    array = getattr(data, name)()
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return Image.fromarray(array).convert("RGB")


def photo_variants(image: Image.Image) -> Iterator[tuple[str, Image.Image]]:
    """The photo itself, three crops of ~70% of it, and its mirror image."""
    w, h = image.size
    cw, ch = int(w * 0.7), int(h * 0.7)
    yield "original", image
    yield "crop-top-left", image.crop((0, 0, cw, ch))
    yield "crop-bottom-right", image.crop((w - cw, h - ch, w, h))
    yield "crop-centre", image.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))
    yield "mirror", ImageOps.mirror(image)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def decode_jpeg(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def photos_zip(path: Path, names: tuple[str, ...] = PHOTOS) -> Path:
    """A labelled zip of real photos: <photo>/<photo>-<variant>.jpg plus metadata.csv."""
    rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            for variant, image in photo_variants(photo(name)):
                filename = f"{name}/{name}-{variant}.jpg"
                zf.writestr(filename, jpeg(image))
                rows.append(
                    {
                        "filename": filename,
                        "title": f"{name} ({variant})",
                        "source": "scikit-image sample data",
                    }
                )
        zf.writestr("metadata.csv", _csv(rows))
    return path


def load_fashion_mnist(split: str = "train", folder: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 28, 28] uint8 and labels [n] from the idx files ('train' or 't10k')."""
    with gzip.open(folder / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def fashion_available(folder: Path = FASHION_DIR) -> bool:
    return (folder / "train-images-idx3-ubyte.gz").is_file()


def fashion_zip(path: Path, per_class: int = 50, seed: int = 0) -> Path:
    """A labelled zip of Fashion-MNIST training images: <class>/<index>.png."""
    images, labels = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for c, cls in enumerate(FASHION_CLASSES):
            picks = rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for i in sorted(picks):
                out = io.BytesIO()
                Image.fromarray(images[i]).save(out, format="PNG")
                zf.writestr(f"{cls}/{i:05d}.png", out.getvalue())
    return path


def _csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def demo_zips(folder: Path, per_class: int = 50) -> dict[str, Path]:
    """The demo training zip of each shipped endpoint (built once, reused): `per_class`
    Fashion-MNIST images of each class when the Debian package is there."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = folder / "photos.zip"
    if not photos.exists():
        photos_zip(photos)
    fashion = photos
    if fashion_available():
        fashion = folder / ("fashion-mnist.zip" if per_class == 50 else f"fashion-mnist-{per_class}.zip")
        if not fashion.exists():
            fashion_zip(fashion, per_class)
    # No food photos can be had offline: the food demo indexes the real sample photos.
    return {"fashion": fashion, "food": photos}


def main(argv: list[str] | None = None) -> int:
    """Train each endpoint that serves no version yet (all of them with --force) on its demo zip."""
    from service.application.wiring import build_service
    from service.core.config import Settings

    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="retrain even if already published")
    parser.add_argument("--fashion-per-class", type=int, default=50, help="Fashion-MNIST images per class")
    args = parser.parse_args(argv)
    service = build_service(Settings.load({"warm_on_start": False}))
    zips = demo_zips(service.settings.cache_dir / "demo", args.fashion_per_class)
    for name in service.specs:
        current = service.versions_of(name).current
        if current and not args.force:
            print(f"{name}: already serving version {current}")
            continue
        zip_path = zips.get(name, zips["food"])
        result = service.train_now(name, zip_path, "auto", lambda progress: None)
        print(f"{name}: trained {result.count} images from {zip_path.name} -> {result.version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
