"""Trains spread over the worker tier: shards on SQS, workers embedding them, one reducer (moto's S3
and SQS over real HTTP; the worker apps take messages the way Elastic Beanstalk's SQS daemon posts them)."""

from __future__ import annotations

import json
import os
import signal
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from bench import demo
from service.core.errors import TrainingError
from service.storage import open_storage, versions
from service.storage.blobs import BlobCache
from service.storage.ranged import RangedFile
from service.training import sharded
from service.training.base import read_base
from tests.helpers import S3Server, Sqsd, Tier, procfile_server, upload, wait_job, wait_serving


def catalogue(tier: Tier, endpoint: str, tmp: Path) -> dict[str, tuple[int, np.ndarray, str]]:
    """name -> (item id, vector, label) of the endpoint's current version, read from the store."""
    storage = open_storage(tier.store["storage_uri"], endpoint_url=tier.store["s3_endpoint_url"])
    base = read_base(storage, endpoint, BlobCache(storage, tmp))
    assert base is not None
    out = {}
    for segment in base.view.segments:
        for row in range(segment.rows):
            entry = segment.entries[row]
            out[segment.names[row]] = (
                int(segment.items[row]),
                np.array(segment.vectors[row]),
                entry["label"],
            )
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

    # Names in another order than the zip's (a/0, b/1, a/2...): shards take runs of the zip's
    # order, the reducer puts every row back where one worker would have.
    zip_path = noise_zip(tmp_path / "mixed.zip", 33)
    with zipfile.ZipFile(zip_path, "a") as zf:  # and files that are skipped, in both orders too
        zf.writestr("b/broken.jpg", b"not a jpeg")
        zf.writestr("a/zzz-broken.png", b"not a png")
        zf.writestr("a/again.jpg", zf.read("b/img-0003.jpg"))  # the same bytes as another
    one = train_on(single, zip_path)
    many = train_on(sharded, zip_path)
    assert one["status"] == many["status"] == "succeeded", (one, many)
    assert not one["shards"] and many["shards"]["total"] == 6, many  # 36 candidates, 7 a shard
    assert many["counts"]["images"] == one["counts"]["images"] == 34
    assert [s["name"] for s in many["skipped"]] == ["a/zzz-broken.png", "b/broken.jpg"]
    a, b = catalogue(single, "food", tmp_path / "a"), catalogue(sharded, "food", tmp_path / "b")
    assert a.keys() == b.keys()
    for name, (item, vector, label) in a.items():
        assert b[name][0] == item and b[name][2] == label
        np.testing.assert_allclose(b[name][1], vector, atol=1e-6)
    assert many["skipped"] == one["skipped"]
    assert {k: v for k, v in many["counts"].items() if k not in ("embedded", "reused")} == {
        k: v for k, v in one["counts"].items() if k not in ("embedded", "reused")
    }
    wait_serving(sharded.web, "food", many["version"])
    # The job's work files are gone; its lease too (garbage collection may run again).
    storage = open_storage(sharded.store["storage_uri"], endpoint_url=s3_server.url)
    assert storage.list(f"jobs/{many['id']}/") == []
    assert [k for k in storage.list("food/leases/")] == []


def shard_messages(tier: Tier, count: int) -> list[dict[str, Any]]:
    """Receive `count` shard messages and hold them (invisible for a minute), in shard order."""
    held = []
    while len(held) < count:
        message = tier.receive(visibility_s=60)
        assert message is not None, f"only {len(held)} of {count} shard messages were queued"
        held.append(message)
    return sorted(held, key=lambda m: json.loads(m["Body"])["shard"])


def test_progress_a_duplicate_delivery_and_the_last_two_shards_at_once(
    s3_server: S3Server,
    make_app: Callable[..., Flask],
    tmp_path: Path,
    photos_zip: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7)
    response = tier.web.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "never"})
    status_url = response.get_json()["status_url"]
    assert tier.deliver().status_code == 200  # the job message: planned, 5 shard messages queued
    planned = tier.web.get(status_url).get_json()
    assert planned["status"] == "running" and planned["stage"] == "embed"
    assert planned["shards"]["total"] == 5 and planned["shards"]["sizes"] == [7, 7, 7, 7, 2]
    assert (planned["done"], planned["total"]) == (0, 30)

    messages = shard_messages(tier, 5)
    for message in messages[:3]:
        assert tier.deliver(message).status_code == 200
    assert tier.deliver(messages[2]).status_code == 200  # delivered twice: nothing changes
    status = tier.web.get(status_url).get_json()
    assert status["shards"]["done"] == 3 and (status["done"], status["total"]) == (21, 30)
    assert status["rate"] > 0

    # The last two shards finish together on two instances: one reducer, one version.
    other = tier.make_worker("second-instance")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(tier.deliver, messages[3:], [tier.worker, other]))
    assert [a.status_code for a in answers] == [200, 200]
    job = tier.web.get(status_url).get_json()
    assert job["status"] == "succeeded" and job["counts"]["images"] == 30, job
    assert tier.deliver(messages[4]).status_code == 200  # a late duplicate of the last shard
    claims = [r for r in caplog.records if "reducer claimed" in r.getMessage()]
    assert len(claims) == 1
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    assert versions.list_versions(storage, "food") == [job["version"]]
    assert len({i for i, _, _ in catalogue(tier, "food", tmp_path / "c").values()}) == 30  # no duplicates


def test_a_poison_shard_is_dead_lettered_and_fails_the_job(
    s3_server: S3Server,
    make_app: Callable[..., Flask],
    tmp_path: Path,
    photos_zip: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = sharded.embed_shard

    def poisoned(spec: Any, storage: Any, settings: Any, plan: Any, shard: int, report: Any) -> bool:
        if shard == 2:  # stands for input that crashes the encoder every time
            raise RuntimeError("the encoder crashed")
        return real(spec, storage, settings, plan, shard, report)

    monkeypatch.setattr(sharded, "embed_shard", poisoned)
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7)
    response = tier.web.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "never"})
    answers = tier.deliver_all()
    assert sorted(a.status_code for a in answers).count(503) == 2  # shard 2, twice
    job = tier.web.get(response.get_json()["status_url"]).get_json()
    assert job["status"] == "failed"
    assert job["error"].startswith("shard 2 (7 images, ") and "after 2 attempts" in job["error"]
    assert "RuntimeError: the encoder crashed" in job["error"]
    dead = tier.sqs.receive_message(QueueUrl=tier.dlq, WaitTimeSeconds=1).get("Messages", [])
    assert len(dead) == 1 and json.loads(dead[0]["Body"])["shard"] == 2
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    assert versions.read_current(storage, "food").version is None  # nothing published
    assert storage.list(f"jobs/{job['id']}/") == []


def test_a_cancelled_sharded_job_drops_its_shards_and_publishes_nothing(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7)
    response = tier.web.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "never"})
    status_url = response.get_json()["status_url"]
    assert tier.deliver().status_code == 200  # planned
    assert tier.deliver().status_code == 200  # one shard embedded
    cancelled = tier.web.delete(status_url)
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
    answers = tier.deliver_all()
    assert len(answers) == 4 and all(a.status_code == 200 for a in answers)
    assert tier.web.get(status_url).get_json()["status"] == "cancelled"
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    assert versions.read_current(storage, "food").version is None
    job_id = status_url.rsplit("/", 1)[1]
    # What it left goes with its pending shards: work files and the job's lease (which would hold
    # garbage collection off the endpoint for JOB_MAX_S); the marker stays with the job's record.
    assert storage.list(f"jobs/{job_id}/") == [] and storage.exists(f"jobs/{job_id}.cancel")
    assert storage.list("food/leases/") == []
    assert tier.web.delete(status_url).status_code == 409  # finished: nothing to cancel
    assert tier.web.delete("/food/jobs/0123456789abcdef").status_code == 404


def noise_zip(path: Path, count: int) -> Path:
    """`count` distinct small photos in two label folders."""
    rng = np.random.default_rng(7)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            zf.writestr(f"{'ab'[i % 2]}/img-{i:04d}.jpg", demo.jpeg(Image.fromarray(pixels)))
    return path


@pytest.mark.slow
def test_a_worker_killed_mid_shard_loses_nothing(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """Two gunicorn worker processes (the Procfile's, worker profile) fed by the SQS daemon's
    stand-in; the one embedding a shard is killed: SQS delivers the shard again after its
    visibility timeout, and the job publishes every image once."""
    tier = Tier(s3_server, make_app, tmp_path, attempts=3, shard_images=100)
    env = {
        "SERVICE_ROLE": "worker",
        "STORAGE_URI": tier.store["storage_uri"],
        "S3_ENDPOINT_URL": s3_server.url,
        "JOB_QUEUE_URL": tier.queue,
        "SQS_ENDPOINT_URL": s3_server.url,
        "SHARD_IMAGES": "100",
        "WEB_CONCURRENCY": "2",
        "TF_INTRA_OP_THREADS": "1",
        "WARM_ON_START": "false",
    }
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    with procfile_server(tmp_path, env) as server:
        sqsd = Sqsd(tier.sqs, tier.queue, server.url, threads=2, visibility_s=6)
        try:
            zip_path = noise_zip(tmp_path / "noise.zip", 400)
            response = tier.web.post("/food/train", data={"file": upload(zip_path), "fine_tune": "never"})
            assert response.status_code == 202, response.get_json()
            job_id = response.get_json()["job_id"]
            killed = None
            deadline = time.monotonic() + 120
            while killed is None and time.monotonic() < deadline:
                for key in storage.list(f"jobs/{job_id}/progress/"):
                    shard = int(Path(key).stem)
                    record = json.loads(storage.read(key))
                    if record["done"] < record["total"] and not storage.exists(
                        sharded.result_key(job_id, shard)
                    ):
                        os.kill(int(record["runner"].rsplit(":", 1)[1]), signal.SIGKILL)
                        killed = shard
                        break
                time.sleep(0.02)
            assert killed is not None, "no shard was caught at work"
            job = wait_job(tier.web, response.get_json()["status_url"], timeout=240)
        finally:
            sqsd.stop()
        log = server.log.read_text()
    assert job["status"] == "succeeded", (job, log[-3000:])
    assert job["counts"]["images"] == 400 and job["shards"]["total"] == 4
    # The killed shard was posted again (no answer the first time), and embedded once in the end.
    posts = [status for message, status in sqsd.posted if message.get("shard") == killed]
    assert 0 in posts and posts[-1] == 200, sqsd.posted
    assert log.count("reducer claimed") == 1
    items = catalogue(tier, "food", tmp_path / "c")
    assert len(items) == 400 and len({i for i, _, _ in items.values()}) == 400


def test_a_sharded_add_extends_the_catalogue_with_new_ids(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7)
    first = train_on(tier, photos_zip)
    assert first["status"] == "succeeded"
    response = tier.web.post("/food/items", data={"file": upload(noise_zip(tmp_path / "more.zip", 16))})
    assert response.status_code == 202
    answers = tier.deliver_all()
    assert len(answers) == 1 + 3 and all(a.status_code == 200 for a in answers)  # planned, 3 shards
    job = tier.web.get(response.get_json()["status_url"]).get_json()
    assert job["status"] == "succeeded" and job["shards"]["total"] == 3, job
    items = catalogue(tier, "food", tmp_path / "c")
    assert len(items) == 46 and len({i for i, _, _ in items.values()}) == 46
    old = catalogue(tier, "food", tmp_path / "d")
    assert {n: v[0] for n, v in old.items() if not n.startswith(("a/", "b/"))} == {
        n: v[0] for n, v in items.items() if not n.startswith(("a/", "b/"))
    }  # the trained items keep their ids
    assert min(items[n][0] for n in items if n.startswith(("a/", "b/"))) >= 30


def test_a_zip_replaced_while_its_shards_run_fails_the_job_for_good(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=3, shard_images=7)
    response = tier.web.post("/food/train", data={"file": upload(photos_zip), "fine_tune": "never"})
    job = tier.web.get(response.get_json()["status_url"]).get_json()
    assert tier.deliver().status_code == 200  # planned on the zip as uploaded
    bucket, key = job["source"].removeprefix("s3://").split("/", 1)
    s3_server.client().put_object(Bucket=bucket, Key=key, Body=b"PK another upload")
    answers = tier.deliver_all()
    assert all(a.status_code == 200 for a in answers)  # bad input: not retried, not dead-lettered
    failed = tier.web.get(response.get_json()["status_url"]).get_json()
    assert failed["status"] == "failed" and "changed while it was being read" in failed["error"]
    assert failed["error"].startswith("shard ")


def test_a_ranged_zip_reads_members_not_the_whole_file(s3_server: S3Server, tmp_path: Path) -> None:
    """zipfile over ranged GETs: the directory and the members asked for, a few requests."""
    path = noise_zip(tmp_path / "big.zip", 400)  # ~1.3 MB of JPEGs
    client = s3_server.client()
    bucket = s3_server.bucket()
    client.put_object(Bucket=bucket, Key="big.zip", Body=path.read_bytes())
    with RangedFile(client, bucket, "big.zip", read_ahead=64 * 1024) as raw, zipfile.ZipFile(raw) as zf:  # type: ignore[arg-type]
        names = zf.namelist()
        assert len(names) == 400
        with zipfile.ZipFile(path) as local:
            for name in names[100:110]:
                assert zf.read(name) == local.read(name)
        assert raw.requests <= 6  # HEAD, the directory, one read-ahead for ten members
        client.put_object(Bucket=bucket, Key="big.zip", Body=b"replaced")
        with pytest.raises(TrainingError, match="changed while it was being read"):
            zf.read(names[-1])


def planned_job(tier: Tier, zip_path: Path) -> tuple[str, list[dict[str, Any]]]:
    """Upload, plan (the job message delivered) and hold every shard message; the job's id."""
    response = tier.web.post("/food/train", data={"file": upload(zip_path), "fine_tune": "never"})
    assert tier.deliver().status_code == 200
    return response.get_json()["job_id"], shard_messages(tier, 5)


def test_a_reducer_that_died_is_taken_over_by_the_next_delivery(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=3, shard_images=7, job_stale_s=1)
    job_id, messages = planned_job(tier, photos_zip)
    for message in messages[:4]:
        assert tier.deliver(message).status_code == 200
    # A worker stored the last shard, claimed the reducer and died in it (its record stopped).
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    sharded.embed_shard(
        tier.worker.application.extensions["simsvc"].specs["food"],  # type: ignore[attr-defined]
        storage,
        tier.worker.application.extensions["simsvc"].settings,  # type: ignore[attr-defined]
        sharded.ShardPlan.read(storage, job_id),  # type: ignore[arg-type]
        4,
        lambda p: None,
    )
    record = json.loads(storage.read(f"jobs/{job_id}.json"))
    storage.write(f"jobs/{job_id}.json", json.dumps({**record, "stage": "gather"}).encode())
    time.sleep(1.5)  # the job record is silent (its stamp has seconds)...
    assert sharded.claim_reducer(storage, job_id, "gone:1")
    # ...but the claim is fresh: a reducer that has not reported yet is never run twice.
    assert tier.deliver(messages[4]).status_code == 503
    time.sleep(1.2)  # past JOB_STALE_S (1 s here) since the claim too
    answer = tier.deliver(messages[4])  # its message, back after the visibility timeout
    assert answer.status_code == 200, answer.get_json()
    job = tier.web.get(f"/food/jobs/{job_id}").get_json()
    assert job["status"] == "succeeded" and job["counts"]["images"] == 30, job


def test_a_sharded_job_past_job_max_s_fails_and_publishes_nothing(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    """Its lease (which keeps garbage collection off the originals its shards uploaded) ends at
    JOB_MAX_S: past it, the job fails instead of publishing images a sweep may have deleted."""
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7, job_max_s=4)
    job_id, messages = planned_job(tier, photos_zip)
    for message in messages[:4]:
        assert tier.deliver(message).status_code == 200
    storage = open_storage(tier.store["storage_uri"], endpoint_url=s3_server.url)
    planned = sharded.ShardPlan.read(storage, job_id)
    if planned is not None:  # (on a slow machine the job may have run over already)
        time.sleep(max(0.0, planned.created + 4.2 - time.time()))
    assert tier.deliver(messages[4]).status_code == 200
    job = tier.web.get(f"/food/jobs/{job_id}").get_json()
    assert job["status"] == "failed" and "JOB_MAX_S=4" in job["error"], job
    assert versions.read_current(storage, "food").version is None
    assert storage.list(f"jobs/{job_id}/") == [] and storage.list("food/leases/") == []


def test_a_late_failure_never_overwrites_a_finished_job_and_bad_shard_messages_change_nothing(
    s3_server: S3Server, make_app: Callable[..., Flask], tmp_path: Path, photos_zip: Path
) -> None:
    tier = Tier(s3_server, make_app, tmp_path, attempts=2, shard_images=7)
    job_id, messages = planned_job(tier, photos_zip)
    for shard, status in [(99, 200), (-1, 422), ("x", 422), (10**7, 422)]:  # dropped, or refused
        answer = tier.worker.post(
            "/worker/jobs",
            json={"job_id": job_id, "shard": shard},
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
            headers={"User-Agent": "aws-sqsd/3.0.4"},
        )
        assert answer.status_code == status, (shard, answer.get_json())
    job = tier.web.get(f"/food/jobs/{job_id}").get_json()
    assert job["status"] == "running" and job["shards"]["done"] == 0  # nothing else happened
    for message in messages:
        assert tier.deliver(message).status_code == 200
    store = tier.worker.application.extensions["simsvc"].jobs.store  # type: ignore[attr-defined]
    late = store.load(None, job_id)
    late.status, late.error = "failed", "shard 0 failed for good"  # a slow first delivery's
    assert not store.save_unless_finished(late)
    assert tier.web.get(f"/food/jobs/{job_id}").get_json()["status"] == "succeeded"
