"""The endpoint's query treatment (`[query]` mirror and expansion): off by default (the bench found
it does not pay, docs/BENCHMARKS.md), and when an endpoint file turns it on, /infer and filters
rank with it (similar items expand their stored vectors) while duplicates stay judged on the
image itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from PIL import ImageOps

from bench import demo
from service.core.endpoint import QueryConfig
from tests.helpers import copy_endpoints, upload, wait_job, wait_serving


def results(client: FlaskClient, image: bytes, url: str = "/food/infer?k=5") -> list[tuple[str, float]]:
    answer = client.post(url, data={"image": upload(image, "q.png")}).get_json()["results"]
    return [(r["name"], r["score"]) for r in answer]


@pytest.fixture(scope="module")
def treated(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, photos_zip: Path) -> Any:
    """`food` with the mirrored query and alpha-query expansion on, trained on the test photos."""
    from service.api.app import create_app
    from tests.helpers import settings_for

    tmp = tmp_path_factory.mktemp("treated")
    endpoints = copy_endpoints(tmp / "endpoints", "food")
    food = endpoints / "food.toml"
    food.write_text(food.read_text().replace("[query]\n", "[query]\nmirror = true\nexpansion = 3\n"))
    app: Flask = create_app(settings_for(tmp, models_dir, endpoints_dir=endpoints))
    client = app.test_client()
    job = wait_job(
        client, client.post("/food/train", data={"file": upload(photos_zip)}).get_json()["status_url"]
    )
    wait_serving(client, "food", job["version"])
    yield client
    app.extensions["simsvc"].close()


def test_by_default_the_query_is_the_plain_vector(trained: FlaskClient) -> None:
    assert QueryConfig() == QueryConfig(mirror=False, expansion=0)
    assert trained.get("/food").get_json()["query"] == {"mirror": False, "expansion": 0, "alpha": 3.0}
    photo = demo.photo("coffee")  # plain: a photo and its mirror image are different queries
    straight, mirrored = results(trained, demo.png(photo)), results(trained, demo.png(ImageOps.mirror(photo)))
    assert [s for _, s in straight] != [s for _, s in mirrored]


def test_with_the_mirror_on_a_photo_and_its_mirror_image_get_the_same_answer(treated: FlaskClient) -> None:
    assert treated.get("/food").get_json()["query"] == {"mirror": True, "expansion": 3, "alpha": 3.0}
    photo = demo.photo("coffee")
    straight = results(treated, demo.png(photo))
    mirrored = results(treated, demo.png(ImageOps.mirror(photo)))
    assert [n for n, _ in straight] == [n for n, _ in mirrored]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(straight, mirrored, strict=True))


def test_similar_items_and_filters_rank_with_the_treatment_too(treated: FlaskClient) -> None:
    rocket = demo.png(demo.photo("rocket"))
    assert results(treated, rocket)[0][0].startswith("rocket/")
    item_id = treated.post("/food/infer?k=1", data={"image": upload(rocket, "q.png")}).get_json()["results"][
        0
    ]["id"]
    similar = treated.get(f"/food/items/{item_id}/similar?k=4").get_json()["results"]
    assert similar and all(r["id"] != item_id for r in similar)
    filtered = results(treated, rocket, "/food/infer?k=5&label=moon")
    assert filtered and all(name.startswith("moon/") for name, _ in filtered)


def test_with_the_treatment_on_infer_ranks_with_it_and_duplicates_still_see_the_image(
    treated: FlaskClient, photos_zip: Path
) -> None:
    import zipfile

    with zipfile.ZipFile(photos_zip) as zf:
        exact = zf.read("rocket/rocket-original.jpg")  # a catalogue image's own bytes
    found = treated.post("/food/infer?k=5&duplicates=true", data={"image": upload(exact, "q.jpg")})
    results_ = found.get_json()["results"]
    assert results_[0]["score"] < 0.999  # the treated vector, not the image's own
    own = next(r for r in results_ if r["name"] == "rocket/rocket-original.jpg")
    assert own["duplicate"] is True and own["duplicate_score"] == 1.0  # judged on the image itself
