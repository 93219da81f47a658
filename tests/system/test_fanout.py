"""Trains spread over the worker tier: shards on SQS, workers embedding them, one reducer (moto's S3
and SQS over real HTTP; the worker apps take messages the way Elastic Beanstalk's SQS daemon posts them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask

from service.storage import open_storage
from service.storage.blobs import BlobCache
from service.training.base import read_base
from tests.helpers import S3Server, Tier, upload, wait_serving


def catalogue(tier: Tier, endpoint: str, tmp: Path) -> dict[str, tuple[int, np.ndarray, str]]:
    """name -> (item id, vector, label) of the endpoint's current version, read from the store."""
    storage = open_storage(tier.store["storage_uri"], endpoint_url=tier.store["s3_endpoint_url"])
    base = read_base(storage, endpoint, BlobCache(storage, tmp))
    assert base is not None
    out = {}
    for segment in base.view.segments:
        for row in range(segment.rows):
            entry = segment.entries[row]
            out[segment.names[row]] = (int(segment.items[row]), np.array(segment.vectors[row]), entry["label"])
    return out


def train_on(tier: Tier, zip_path: Path, **form: Any) -> dict[str, Any]:
    response = tier.web.post("/food/train", data={"file": upload(zip_path), "fine_tune": "never", **form})
    assert response.status_code == 202, response.get_json()
    answers = tier.deliver_all()
    assert all(a.status_code == 200 for a in answers), [a.get_json() for a in answers]
    return tier.web.get(response.get_json()["status_url"]).get_json()


def test_a_sharded_train_publishes_the_catalogue_one_worker_would(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    single = Tier(s3_server, make_app, tmp_path / "single", attempts=2)
    sharded = Tier(s3_server, make_app, tmp_path / "sharded", attempts=2, shard_images=7)

    one = train_on(single, photos_zip)
    many = train_on(sharded, photos_zip)
    assert one["status"] == many["status"] == "succeeded", (one, many)
    assert not one["shards"] and many["shards"]["total"] == 5, many  # 30 images, 7 a shard
    assert many["counts"]["images"] == one["counts"]["images"] == 30
    a, b = catalogue(single, "food", tmp_path / "a"), catalogue(sharded, "food", tmp_path / "b")
    assert a.keys() == b.keys()
    for name, (item, vector, label) in a.items():
        assert b[name][0] == item and b[name][2] == label
        np.testing.assert_allclose(b[name][1], vector, atol=1e-6)
    wait_serving(sharded.web, "food", many["version"])
    # The job's work files are gone; its lease too (garbage collection may run again).
    storage = open_storage(sharded.store["storage_uri"], endpoint_url=s3_server.url)
    assert storage.list(f"jobs/{many['id']}/") == []
    assert [k for k in storage.list("food/leases/")] == []
