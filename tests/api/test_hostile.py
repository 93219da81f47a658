"""Hostile and odd input: zip bombs, traversal, symlinks, encrypted and nested archives, broken and
odd images, pixel bombs, formats; each gets a clear answer and nothing escapes or crashes."""

from __future__ import annotations

import io
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image

from bench import demo
from service.catalog.images import decode
from tests.helpers import make_zip, upload, wait_job, wait_serving

JPEG = demo.jpeg(demo.photo("coffee").resize((120, 80)))


def png(image: Image.Image, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **kwargs)
    return out.getvalue()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(max_image_pixels=4_000_000)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def train_zip(client: FlaskClient, data: bytes) -> dict:
    response = client.post("/food/train", data={"file": upload(data), "fine_tune": "never"})
    assert response.status_code == 202, response.get_json()
    return wait_job(client, response.get_json()["status_url"])


def test_a_zip_bomb_is_refused_before_anything_is_unpacked(app: Flask, client: FlaskClient) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/bomb.jpg", b"\0" * 50_000_000)  # 50 MB of zeros: ~50 KB compressed
    response = client.post("/food/train", data={"file": upload(out.getvalue())})
    assert response.status_code == 413 and "zip bomb" in response.get_json()["message"]
    uploads = app.extensions["simsvc"].uploads_dir
    assert list(uploads.iterdir()) == []


def test_paths_outside_the_job_and_symlinks_never_touch_anything(
    app: Flask, client: FlaskClient, tmp_path: Path
) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("good/coffee.jpg", JPEG)
        zf.writestr("../../escaped.jpg", JPEG)
        zf.writestr("/etc/absolute.jpg", JPEG)
        zf.writestr("good/..\\..\\windows.jpg", JPEG)
        link = zipfile.ZipInfo("good/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    job = train_zip(client, out.getvalue())
    assert job["status"] == "succeeded" and job["counts"]["images"] == 1
    reasons = {s["name"]: s["reason"] for s in job["skipped"]}
    assert reasons["../../escaped.jpg"] == "unsafe path"
    assert reasons["/etc/absolute.jpg"] == "unsafe path"
    assert reasons["good/..\\..\\windows.jpg"] == "unsafe path"
    assert reasons["good/link.jpg"].startswith("symbolic link")
    root = Path(app.extensions["simsvc"].storage.uri.removeprefix("file://"))
    for base in (tmp_path, tmp_path.parent, root.parent):
        assert not list(base.rglob("escaped.jpg")) and not list(base.rglob("absolute.jpg"))


def test_encrypted_and_nested_archives_are_skipped_with_a_reason(client: FlaskClient) -> None:
    data = bytearray(
        make_zip({"ok/coffee.jpg": JPEG, "ok/secret.jpg": JPEG, "ok/inner.zip": make_zip({"x.jpg": JPEG})})
    )
    # Mark ok/secret.jpg encrypted (general purpose flag bit 0) in its local and central headers,
    # as an archiver with a password would; zipfile itself cannot write encrypted entries.
    name = b"ok/secret.jpg"
    local = data.index(name) - 30
    central = data.index(name, local + 31) - 46
    data[local + 6] |= 0x1
    data[central + 8] |= 0x1
    job = train_zip(client, bytes(data))
    reasons = {s["name"]: s["reason"] for s in job["skipped"]}
    assert job["counts"]["images"] == 1
    assert reasons["ok/secret.jpg"] == "encrypted entry"
    assert "nested archives are not read" in reasons["ok/inner.zip"]


def test_broken_and_empty_files_are_skipped_with_a_reason(client: FlaskClient) -> None:
    job = train_zip(
        client,
        make_zip(
            {
                "a/ok.jpg": JPEG,
                "a/empty.jpg": b"",
                "a/truncated.jpg": JPEG[: len(JPEG) // 3],
                "a/text.jpg": b"this is not a JPEG",
                "a/doc.pdf": b"%PDF-1.4",
            }
        ),
    )
    reasons = {s["name"]: s["reason"] for s in job["skipped"]}
    assert job["counts"]["images"] == 1
    assert reasons["a/empty.jpg"] == "empty file"
    assert "could not be decoded" in reasons["a/truncated.jpg"]
    assert (
        "not a decodable image" in reasons["a/text.jpg"] and "not a decodable image" in reasons["a/doc.pdf"]
    )


ODD_IMAGES = {
    "cmyk.jpg": lambda: demo.photo("coffee").convert("CMYK"),
    "palette.png": lambda: demo.photo("coffee").convert("P", palette=Image.Palette.ADAPTIVE),
    "alpha.png": lambda: demo.photo("coffee").convert("RGBA"),
    "grey-alpha.png": lambda: demo.photo("coffee").convert("LA"),
    "bilevel.png": lambda: demo.photo("coffee").convert("1"),
    "grey16.png": lambda: Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_image_modes_decode_to_rgb(name: str) -> None:
    image = ODD_IMAGES[name]()
    out = io.BytesIO()
    image.save(out, format="JPEG" if name.endswith(".jpg") else "PNG")
    decoded, _ = decode(out.getvalue(), 10**8)
    assert decoded.mode == "RGB" and decoded.size == image.size


def test_odd_images_train_and_query(client: FlaskClient) -> None:
    files = {}
    for name, make in ODD_IMAGES.items():
        out = io.BytesIO()
        make().save(out, format="JPEG" if name.endswith(".jpg") else "PNG")
        files[f"odd/{name}"] = out.getvalue()
    job = train_zip(client, make_zip(files))
    assert job["counts"]["images"] == len(ODD_IMAGES) and job["skipped"] == []


def test_a_pixel_bomb_is_refused_without_decoding(client: FlaskClient) -> None:
    bomb = png(Image.new("L", (5000, 5000)))  # 25 M pixels, a few KB of PNG
    job = train_zip(client, make_zip({"a/bomb.png": bomb, "a/ok.jpg": JPEG}))
    assert {s["name"]: s["reason"] for s in job["skipped"]}["a/bomb.png"].startswith("image is 5000x5000")
    wait_serving(client, "food", job["version"])
    response = client.post("/food/infer", data=bomb, content_type="image/png")
    assert response.status_code == 400
    assert "over the limit of 4000000 pixels" in response.get_json()["message"]


def test_only_the_configured_formats_are_taken(make_app: Callable[..., Flask]) -> None:
    client = make_app(image_formats="JPEG").test_client()
    job = train_zip(client, make_zip({"a/ok.jpg": JPEG, "a/no.png": png(demo.photo("moon"))}))
    assert {s["name"]: s["reason"] for s in job["skipped"]}["a/no.png"] == (
        "unsupported image format PNG (use JPEG)"
    )
    with pytest.raises(ValueError, match="IMAGE_FORMATS"):
        make_app(image_formats="TIFF")
