"""Versions in the format before content-addressed storage (a folder of files each): served as they
are, migrated by the first change (or `python -m service migrate`) without embedding anything, and
still there to roll back to."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask

from service.catalog import jsonmap
from service.catalog.index import build_index
from service.catalog.view import View
from service.storage import versions
from service.storage.blobs import sha256_file
from service.storage.local import LocalStorage
from tests.helpers import cli, make_zip, photo_jpeg, submit, upload

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "moon")


def to_format_1(store: LocalStorage, cache: Path, version: str) -> str:
    """Rewrite a trained version as a format-1 folder (what the service published before), make it
    the only version, and return its id."""
    manifest = versions.read_manifest(store, "food", version)
    view = View.open(manifest, lambda ref, label: store.root / ref.key_in("food"), 0)
    (segment,) = view.segments
    legacy = versions.new_version_id()
    folder = store.root / "food" / "versions" / legacy
    (folder / "images").mkdir(parents=True)
    vectors = np.asarray(segment.vectors, dtype=np.float32)
    np.save(folder / "vectors.npy", vectors, allow_pickle=False)
    np.save(folder / "rows.npy", np.asarray(segment.items, dtype=np.int64), allow_pickle=False)
    _, thumbs, mirrored = segment.training_inputs(head=False)
    np.save(folder / "thumbs.npy", thumbs.astype(np.float16), allow_pickle=False)
    if mirrored is not None:
        np.save(folder / "mirrored.npy", mirrored.astype(np.float16), allow_pickle=False)
    build_index(vectors, 4, folder / "index.ann")
    jsonmap.write(folder / "ids.json", list(segment.names))
    jsonmap.write(folder / "metadata.json", [dict(e) for e in segment.entries])
    for entry in segment.entries:
        shutil.copyfile(store.root / segment.ref.image_key("food", entry["image"]), folder / entry["image"])
    shutil.copyfile(store.root / manifest.encoder_model.key_in("food"), folder / "encoder.tflite")  # type: ignore[union-attr]
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in folder.rglob("*")
        if p.is_file()
    }
    raw = {**manifest.to_json(), "version": legacy, "lineage": legacy, "files": files}
    for key in ("format", "segments", "encoder_model", "head"):
        raw.pop(key)
    raw["head"] = None
    (folder / "manifest.json").write_text(json.dumps(raw))
    shutil.rmtree(store.root / "food" / "manifests")
    shutil.rmtree(store.root / "food" / "blobs")
    store.write("food/CURRENT", json.dumps({"version": legacy}).encode())
    shutil.rmtree(cache / "published", ignore_errors=True)
    return legacy


@pytest.fixture
def legacy(make_app: Callable[..., Flask]) -> tuple[Flask, str]:
    trainer = make_app()
    first = submit(
        trainer.test_client(),
        "/food/train",
        {"file": upload(make_zip({f"photos/{n}.jpg": photo_jpeg(n) for n in PHOTOS}))},
    )
    service = trainer.extensions["simsvc"]
    old = to_format_1(service.storage, service.settings.cache_dir, first["version"])
    return make_app(keep_versions=20, warm_on_start=False), old


def test_a_format_1_version_is_served_as_it_is(legacy: tuple[Flask, str]) -> None:
    app, old = legacy
    client = app.test_client()
    body = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    assert body["version"] == old and body["results"][0]["name"] == "photos/moon.jpg"
    with client.get(f"/food/items/{body['results'][0]['id']}/image") as image:
        assert image.status_code == 200 and image.data == photo_jpeg("moon")
    assert client.get("/food/versions").get_json()["versions"][0]["version"] == old


def test_the_first_change_migrates_without_embedding_and_rollback_still_works(
    legacy: tuple[Flask, str],
) -> None:
    app, old = legacy
    client, service = app.test_client(), app.extensions["simsvc"]
    moon = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()[
        "results"
    ][0]
    edited = client.patch(f"/food/items/{moon['id']}", json={"label": "space"})
    assert edited.status_code == 200, edited.get_json()
    listed = client.get("/food/versions").get_json()["versions"]
    assert [v["change"] for v in listed] == ["train", "migrate", "edit"]
    migrated = versions.read_manifest(service.storage, "food", listed[1]["version"])
    assert migrated.format == 2 and migrated.count == 6 and migrated.segments[0].images is None
    assert all(service.storage.exists(f"food/blobs/{r.sha256[:2]}/{r.sha256}") for r in migrated.blobs())
    after = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    assert after["results"][0]["id"] == moon["id"] and after["results"][0]["label"] == "space"
    with client.get(f"/food/items/{moon['id']}/image") as image:
        assert image.data == photo_jpeg("moon")  # now a blob
    added = submit(client, "/food/items", {"file": upload(make_zip({"x/coins.jpg": photo_jpeg("coins")}))})
    assert added["counts"]["embedded"] == 1  # only the new image; the migrated ones kept their vectors
    # The format-1 version is still there: a rollback to it works.
    assert client.post("/food/rollback", json={"version": old}).status_code == 200
    back = client.post("/food/infer?k=1", data=photo_jpeg("moon"), content_type="image/jpeg").get_json()
    assert back["version"] == old and back["results"][0]["label"] == "photos"


@pytest.mark.slow  # the CLI as a subprocess
def test_the_migrate_command_does_it_ahead_of_any_change(legacy: tuple[Flask, str], models_dir: Path) -> None:
    app, old = legacy
    settings = app.extensions["simsvc"].settings
    env = {
        "STORAGE_URI": settings.storage_uri,
        "CACHE_DIR": str(settings.cache_dir),
        "MODELS_DIR": str(models_dir),
        "PATH": "/usr/bin:/bin",
    }
    done = cli("migrate", "food", env=env)
    assert done.returncode == 0, done.stderr
    assert "migrated ->" in done.stdout
    again = cli("migrate", "food", env=env)  # nothing left to do
    assert again.returncode == 0 and "nothing to migrate" in again.stdout
    listed = app.test_client().get("/food/versions").get_json()["versions"]
    assert [v["change"] for v in listed] == ["train", "migrate"]
