"""Duplicates over HTTP (issue 22): the report job (JSON and CSV, tied to its version), "not
duplicates" marks, on_duplicate on /items and /train, and ?duplicates on /infer."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image, ImageEnhance, ImageOps

from bench import demo
from tests.helpers import make_zip, seed_cache, upload, wait_job, wait_serving


def start_report(client: FlaskClient, endpoint: str = "food", **params: Any) -> dict[str, Any]:
    response = client.post(f"/{endpoint}/duplicates", query_string=params)
    assert response.status_code == 202, response.get_json()
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "succeeded" and job["kind"] == "duplicates", job
    report = client.get(f"/{endpoint}/duplicates/{job['id']}")
    assert report.status_code == 200
    return dict(report.get_json())


def copy_of(photo: str, edit: str) -> bytes:
    """A near-duplicate a shop would upload: the photo resized, recompressed, brightened, mirrored."""
    image = demo.photo(photo)
    if edit == "resize":
        image = image.resize((image.width * 7 // 10, image.height * 7 // 10))
    elif edit == "brightness":
        image = ImageEnhance.Brightness(image).enhance(1.15)
    elif edit == "mirror":
        image = ImageOps.mirror(image)
    return demo.jpeg(image, quality=40)


def catalogue_ids(client: FlaskClient, photo: str) -> set[int]:
    """The ids of the catalogue's images of a photo, found through /infer with the original."""
    found = client.post("/food/infer", data={"image": upload(demo.jpeg(demo.photo(photo)), "q.jpg")})
    return {r["id"] for r in found.get_json()["results"] if r["name"].startswith(f"{photo}/")}


def test_a_report_groups_copies_of_one_photo_never_two_photos(trained: FlaskClient) -> None:
    report = start_report(trained)
    current = trained.get("/food").get_json()["version"]
    assert report["version"] == current and report["stale"] is False
    assert report["groups"], "the demo photos' mirrored and recompressed variants are duplicates"
    for group in report["groups"]:
        photos = {item["name"].split("/")[0] for item in group["items"]}
        assert len(photos) == 1, group
        ids = [item["id"] for item in group["items"]]
        assert ids[0] == min(ids)  # the keeper: the oldest item
        assert group["items"][0]["score"] == 1.0
        # Each item scores against the keeper: a copy of a copy may score lower than the threshold.
        assert all(0 <= item["score"] <= 1 for item in group["items"])
        with trained.get(group["items"][1]["image_url"]) as image:
            assert image.status_code == 200 and image.mimetype.startswith("image/")
    assert report["counts"]["groups"] == len(report["groups"])

    table = trained.get(f"/food/duplicates/{report['id']}", headers={"Accept": "text/csv"})
    assert table.status_code == 200 and table.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(table.get_data(as_text=True))))
    assert len(rows) == sum(len(g["items"]) for g in report["groups"])
    assert rows[0]["keeper"] == "yes" and rows[0]["group"] == "1"


def test_a_group_marked_not_duplicates_is_left_out_of_the_next_report(trained: FlaskClient) -> None:
    first = start_report(trained)
    group = first["groups"][0]
    ids = [item["id"] for item in group["items"]]
    marked = trained.post("/food/duplicates/ignored", json={"ids": ids})
    assert marked.status_code == 200 and sorted(ids) in marked.get_json()["ignored"]
    assert sorted(ids) in trained.get("/food/duplicates/ignored").get_json()["ignored"]
    second = start_report(trained)
    assert all(sorted(i["id"] for i in g["items"]) != sorted(ids) for g in second["groups"])
    assert trained.post("/food/duplicates/ignored", json={"ids": [ids[0]]}).status_code == 422
    assert trained.post("/food/duplicates/ignored", json={"ids": "x"}).status_code == 422
    assert trained.post("/food/duplicates/ignored", json={"ids": list(range(101))}).status_code == 422
    unknown = trained.post("/food/duplicates/ignored", json={"ids": [ids[0], 10**12]})
    assert unknown.status_code == 404 and str(10**12) in unknown.get_json()["message"]
    # A mark can be taken back; one that is not there is a 404.
    assert trained.delete("/food/duplicates/ignored", json={"ids": ids}).status_code == 200
    assert sorted(ids) not in trained.get("/food/duplicates/ignored").get_json()["ignored"]
    assert trained.delete("/food/duplicates/ignored", json={"ids": ids}).status_code == 404
    third = start_report(trained)
    assert any(sorted(i["id"] for i in g["items"]) == sorted(ids) for g in third["groups"])


@pytest.mark.parametrize("threshold", ["0", "-0.5", "1.01", "nan", "abc"])
def test_a_threshold_outside_0_1_is_a_422(trained: FlaskClient, threshold: str) -> None:
    response = trained.post(f"/food/duplicates?threshold={threshold}")
    assert response.status_code == 422
    assert "threshold" in str(response.get_json())


def test_reports_of_nothing_or_of_another_endpoint_are_4xx(trained: FlaskClient) -> None:
    untrained = trained.post("/fashion/duplicates")
    assert untrained.status_code == 409 and "train it first" in untrained.get_json()["message"]
    assert trained.get("/food/duplicates/0123456789abcdef").status_code == 404
    assert trained.get("/food/duplicates/not-a-job").status_code == 404
    report = start_report(trained)
    other = trained.get(f"/fashion/duplicates/{report['id']}")
    assert other.status_code == 404 and other.get_json()["message"]
    # A train's job is not a report, nor is a report a job of another endpoint's.
    job = trained.post("/food/compact")  # a 409 (nothing to merge) or a job: either way no report
    if job.status_code == 202:
        other_job = job.get_json()["job_id"]
        answer = trained.get(f"/food/duplicates/{other_job}")
        assert answer.status_code == 404 and "duplicate report" in answer.get_json()["message"]
    assert "duplicate report" in trained.get("/food/duplicates/0123456789abcdef").get_json()["message"]


def test_a_report_stays_tied_to_its_version(make_app: Any, photos_zip: Path) -> None:
    client = make_app().test_client()
    response = client.post("/food/train", data={"file": upload(photos_zip)})
    job = wait_job(client, response.get_json()["status_url"])
    wait_serving(client, "food", job["version"])
    report = start_report(client)
    doomed = report["groups"][0]["items"][-1]
    deleted = client.delete("/food/items", json={"ids": [doomed["id"]]})
    assert deleted.status_code == 200
    wait_serving(client, "food", deleted.get_json()["version"])
    again = client.get(f"/food/duplicates/{report['id']}").get_json()
    assert again["version"] == report["version"] and again["stale"] is True
    assert again["current_version"] == deleted.get_json()["version"]
    # Deleting from the old report's groups: only the ids named; one already gone is a 404.
    before = client.get("/food").get_json()
    gone = client.delete("/food/items", json={"ids": [doomed["id"], report["groups"][0]["items"][0]["id"]]})
    assert gone.status_code == 404
    assert client.get("/food").get_json()["version"] == before["version"]


def test_infer_marks_duplicates_of_the_query(trained: FlaskClient) -> None:
    query = {"image": upload(copy_of("chelsea", "resize"), "q.jpg")}
    marked = trained.post("/food/infer?duplicates=true", data=query).get_json()["results"]
    assert marked[0]["name"].startswith("chelsea/") and marked[0]["duplicate"] is True
    assert all("duplicate_score" in r for r in marked)
    assert any(r["duplicate"] is False for r in marked)  # other photos are not copies
    only = trained.post(
        "/food/infer?duplicates_only=true", data={"image": upload(copy_of("chelsea", "resize"), "q.jpg")}
    ).get_json()["results"]
    assert only and all(r["duplicate"] and r["name"].startswith("chelsea/") for r in only)
    noise = Image.effect_noise((200, 200), 80).convert("RGB")
    nothing = trained.post(
        "/food/infer?duplicates_only=true", data={"image": upload(demo.jpeg(noise), "n.jpg")}
    ).get_json()["results"]
    assert nothing == []
    plain = trained.post("/food/infer", data={"image": upload(copy_of("chelsea", "resize"), "q.jpg")})
    assert "duplicate" not in plain.get_json()["results"][0]  # the plain query pays nothing for it


def test_items_flag_and_skip_copies_of_the_catalogue_and_of_each_other(
    make_app: Any, photos_zip: Path
) -> None:
    client = make_app().test_client()
    response = client.post("/food/train", data={"file": upload(photos_zip)})
    job = wait_job(client, response.get_json()["status_url"])
    wait_serving(client, "food", job["version"])
    count = client.get("/food").get_json()["count"]
    copies = make_zip(
        {
            "new/chelsea-copy.jpg": copy_of("chelsea", "resize"),
            "new/rocket-copy.jpg": copy_of("rocket", "brightness"),
            "new/page-a.jpg": demo.jpeg(demo.photo("page")),  # not in the catalogue
            "new/page-b.jpg": copy_of("page", "brightness"),  # a copy of the zip's own image
        }
    )
    flagged = client.post("/food/items", data={"file": upload(copies), "on_duplicate": "flag"})
    job = wait_job(client, flagged.get_json()["status_url"])
    assert job["status"] == "succeeded" and job["on_duplicate"] == "flag", job
    listed = {d["name"]: d for d in job["counts"]["duplicates"]["listed"]}
    assert set(listed) == {"new/chelsea-copy.jpg", "new/rocket-copy.jpg", "new/page-b.jpg"}
    assert listed["new/chelsea-copy.jpg"]["duplicate_of"]["name"].startswith("chelsea/")
    assert listed["new/chelsea-copy.jpg"]["duplicate_of"]["in"] == "catalogue"
    # Within a zip the first name is the older item (ids follow the names' order).
    assert listed["new/page-b.jpg"]["duplicate_of"] == {
        "id": listed["new/page-b.jpg"]["duplicate_of"]["id"],
        "name": "new/page-a.jpg",
        "in": "upload",
    }
    wait_serving(client, "food", job["version"])
    assert client.get("/food").get_json()["count"] == count + 4  # flag adds them all

    again = make_zip(
        {
            "more/chelsea-copy.jpg": copy_of("chelsea", "mirror"),
            "more/brick.jpg": demo.jpeg(demo.photo("brick")),
        }
    )
    skipped = client.post("/food/items", data={"file": upload(again), "on_duplicate": "skip"})
    job = wait_job(client, skipped.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    assert [d["name"] for d in job["counts"]["duplicates"]["listed"]] == ["more/chelsea-copy.jpg"]
    assert job["counts"]["duplicates"]["skipped"] == 1
    wait_serving(client, "food", job["version"])
    assert client.get("/food").get_json()["count"] == count + 5  # only the brick


def test_a_train_skips_the_zips_copies_of_itself(make_app: Any) -> None:
    client = make_app().test_client()
    files = {
        "cat/chelsea.jpg": demo.jpeg(demo.photo("chelsea")),
        "cat/chelsea-small.jpg": copy_of("chelsea", "resize"),
        "rocket/rocket.jpg": demo.jpeg(demo.photo("rocket")),
        "coffee/coffee-a.jpg": demo.jpeg(demo.photo("coffee")),
        "coffee/coffee-b.jpg": demo.jpeg(demo.photo("coffee")),  # the same bytes
    }
    response = client.post("/food/train", data={"file": upload(make_zip(files)), "on_duplicate": "skip"})
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    listed = {d["name"]: d["duplicate_of"]["name"] for d in job["counts"]["duplicates"]["listed"]}
    # ids follow the names' order: "chelsea-small" sorts before "chelsea.jpg" and is the older item
    assert listed == {
        "cat/chelsea.jpg": "cat/chelsea-small.jpg",
        "coffee/coffee-b.jpg": "coffee/coffee-a.jpg",
    }
    wait_serving(client, "food", job["version"])
    assert client.get("/food").get_json()["count"] == 3
    bad = client.post("/food/items", data={"file": upload(make_zip(files)), "on_duplicate": "maybe"})
    assert bad.status_code == 422 and "on_duplicate" in str(bad.get_json())


def test_a_report_is_on_the_version_current_in_the_store_not_the_one_this_instance_loaded(
    make_app: Any, photos_zip: Path, tmp_path: Path
) -> None:
    # Two instances on one store, like a web and a worker instance: the worker loaded the first
    # version and does not watch CURRENT (WARM_ON_START=false on the worker tier).
    web = make_app().test_client()
    job = wait_job(web, web.post("/food/train", data={"file": upload(photos_zip)}).get_json()["status_url"])
    wait_serving(web, "food", job["version"])
    worker = make_app(cache_dir=seed_cache(tmp_path / "worker-cache"), warm_on_start=False).test_client()
    assert (
        worker.post("/food/infer", data={"image": upload(copy_of("moon", "resize"), "q.jpg")}).status_code
        == 200
    )
    first = start_report(worker)
    doomed = first["groups"][0]["items"][-1]["id"]
    deleted = web.delete("/food/items", json={"ids": [doomed]}).get_json()
    second = start_report(worker)
    assert second["version"] == deleted["version"] and second["stale"] is False
    assert doomed not in {i["id"] for g in second["groups"] for i in g["items"]}


def test_counts_after_a_skip_stay_whole(make_app: Any) -> None:
    client = make_app().test_client()
    files = {
        "a/chelsea.jpg": demo.jpeg(demo.photo("chelsea")),
        "a/chelsea-b.jpg": copy_of("chelsea", "resize"),
        "b/rocket.jpg": demo.jpeg(demo.photo("rocket")),
    }
    response = client.post("/food/train", data={"file": upload(make_zip(files)), "on_duplicate": "skip"})
    job = wait_job(client, response.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    counts = job["counts"]
    assert counts["images"] == 2 and counts["embedded"] == 3 and counts["reused"] == 0
    assert counts["duplicates"]["skipped"] == 1
