"""Compaction against what else may happen while it runs: a `replace` train, a rollback, and the
policy's bound on an overlay."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from flask import Flask

from service.storage import versions
from service.storage.manifest import BlobRef, Manifest, SegmentRef
from service.training import compaction
from service.training import train as training
from service.training.results import Progress
from tests.helpers import make_zip, photo_jpeg, submit, upload
from tests.training.test_segments import PHOTOS, catalog_zip, ids


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(keep_versions=20)


def test_a_compaction_while_a_replace_train_runs_brings_no_replaced_item_back(
    app: Flask, tmp_path: Path
) -> None:
    client, service = app.test_client(), app.extensions["simsvc"]
    spec = service.specs["food"]
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    submit(client, "/food/items", {"file": upload(make_zip({"more/coins.jpg": photo_jpeg("coins")}))})
    zip_path = tmp_path / "replace.zip"
    zip_path.write_bytes(catalog_zip(("astronaut", "chelsea")))
    done = []

    def meanwhile(progress: Progress) -> None:
        if progress.stage == "index" and not done:  # the train has read its base: a compaction lands
            done.append(compaction.compact(spec, service.storage, service.settings, every_segment=True))

    training.train(spec, zip_path, service.storage, service.settings, meanwhile, fine_tune="never")
    assert done[0].counts["segments_merged"] == 2  # it moved every item into a new segment
    service.endpoint("food").refresh(force=True)
    # A compaction changes no item: the train's result is its zip, nothing of the old catalog.
    assert client.get("/food").get_json()["count"] == 2
    assert {name for name, _ in ids(client).items()} == {"photos/astronaut.jpg", "photos/chelsea.jpg"}


def test_a_compaction_gives_up_rather_than_drop_an_item_a_rollback_restored(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, service = app.test_client(), app.extensions["simsvc"]
    trained = submit(client, "/food/train", {"file": upload(catalog_zip())})
    found = ids(client)
    client.delete(f"/food/items/{found['photos/moon.jpg']}")
    client.patch(f"/food/items/{found['photos/coffee.jpg']}", json={"label": "cups"})
    prepare = compaction.Merge.prepare

    def prepare_then_roll_back(merge: compaction.Merge, base: object, folder: Path) -> None:
        prepare(merge, base, folder)  # type: ignore[arg-type]
        versions.rollback(service.storage, "food", trained["version"])  # moon back, the edit undone

    monkeypatch.setattr(compaction.Merge, "prepare", prepare_then_roll_back)
    result = compaction.compact(service.specs["food"], service.storage, service.settings, every_segment=True)
    assert result.counts["segments_merged"] == 0 and "rolled back" in result.counts["skipped"]
    assert versions.read_current(service.storage, "food").version == trained["version"]


def test_a_compaction_undoes_an_edit_a_rollback_undid(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    client, service = app.test_client(), app.extensions["simsvc"]
    submit(client, "/food/train", {"file": upload(catalog_zip())})
    found = ids(client)
    deleted = client.delete(f"/food/items/{found['photos/moon.jpg']}").get_json()["version"]
    client.patch(f"/food/items/{found['photos/coffee.jpg']}", json={"label": "cups"})
    prepare = compaction.Merge.prepare

    def prepare_then_roll_back(merge: compaction.Merge, base: object, folder: Path) -> None:
        prepare(merge, base, folder)  # type: ignore[arg-type]  # the merged rows say "cups"
        versions.rollback(service.storage, "food", deleted)  # the edit undone; moon still deleted

    monkeypatch.setattr(compaction.Merge, "prepare", prepare_then_roll_back)
    result = compaction.compact(service.specs["food"], service.storage, service.settings, every_segment=True)
    assert result.counts["segments_merged"] == 1
    assert versions.read_manifest(service.storage, "food", result.version).base == deleted
    service.endpoint("food").refresh(force=True)
    now = ids(client)
    assert "photos/moon.jpg" not in now and client.get("/food").get_json()["count"] == len(PHOTOS) - 1
    coffee = client.post("/food/infer?k=1", data=photo_jpeg("coffee"), content_type="image/jpeg").get_json()
    assert coffee["results"][0]["label"] == "photos"


def _one_segment(segment: SegmentRef) -> Manifest:
    return Manifest(
        endpoint="food", version="v", created_at="", lineage="v", base=None, encoder={}, runtime={},
        dim=4, metric="angular", n_trees=1, search_k=0, count=segment.rows, rows=segment.rows,
        next_id=segment.rows, labels={}, segments=(segment,),
    )  # fmt: skip


def test_a_lone_segment_is_compacted_once_its_overlay_passes_its_bound() -> None:
    files = {name: BlobRef("a" * 64, 1) for name in ("items", "names", "entries", "index")}
    policy = compaction.Policy()
    small = BlobRef("b" * 64, policy.max_overlay_bytes)
    big = BlobRef("c" * 64, policy.max_overlay_bytes + 1)
    segment = SegmentRef(id="s", rows=100_000, live=100_000, files=files, overlay=small)
    assert compaction.plan(_one_segment(segment), policy) == []
    assert compaction.plan(_one_segment(replace(segment, overlay=big)), policy) == [0]
