"""Faults: a worker killed mid-job, a process killed mid-publish, a disk that fills up. The job
ends failed (never stuck), temporary files go, and CURRENT never names an incomplete version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bench import demo
from service.core.config import ROOT
from service.storage import blobs, gc, versions
from service.storage.local import LocalStorage
from service.storage.manifest import blob_key
from tests.helpers import Server, files, make_zip, manifest_of, procfile_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Server]:
    env = {
        "WEB_CONCURRENCY": "2",
        "MODELS_DIR": str(models_dir),
        "WATCH_INTERVAL_S": "0.5",
        "JOB_STALE_S": "4",
    }
    with procfile_server(tmp_path_factory.mktemp("faults"), env) as running:
        yield running


def post_train(server: Server, zip_bytes: bytes) -> str:
    response = requests.post(
        f"{server.url}/fashion/train",
        files={"file": ("z.zip", zip_bytes)},
        data={"fine_tune": "never"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return response.json()["status_url"]


def wait_for(server: Server, status_url: str, done: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(status_url, timeout=10).json()
        if job["status"] in done:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job stayed {job}")


def test_a_worker_killed_mid_job_leaves_a_failed_job_and_no_leftovers(server: Server, tmp_path: Path) -> None:
    first = wait_for(
        server,
        post_train(server, make_zip({f"{n}/{n}.jpg": demo.jpeg(demo.photo(n)) for n in ("moon", "coffee")})),
        ("succeeded",),
    )
    assert server.versions_by_worker("fashion", first["version"])

    big = demo.fashion_zip(tmp_path / "big.zip", per_class=300)  # 3,000 images: several seconds
    status_url = post_train(server, big.read_bytes())
    deadline = time.monotonic() + 60
    while (job := requests.get(status_url, timeout=10).json())["stage"] != "embed":
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert "runner" not in job  # host:pid stays in the store, for the operator
    record = json.loads((server.log.parent / "store" / "jobs" / f"{job['id']}.json").read_text())
    pid = int(record["runner"].rsplit(":", 1)[1])
    assert pid in server.workers()
    # The job runs in a child process of that worker (TRAIN_IN_CHILD): it must die with it.
    tasks = Path(f"/proc/{pid}/task").iterdir()  # a thread of the worker started it
    children = {int(c) for task in tasks for c in (task / "children").read_text().split()}
    assert children, "the job runs in a child process of the worker"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children):
        assert time.monotonic() < deadline, "the job's process outlived its worker"
        time.sleep(0.05)

    failed = wait_for(server, status_url, ("failed", "succeeded"), timeout=60)
    assert failed["status"] == "failed" and "stopped" in failed["error"]
    # CURRENT is untouched: every worker (the restarted one too) serves the first version.
    assert server.versions_by_worker("fashion", first["version"]) == dict.fromkeys(
        server.workers(), first["version"]
    )
    # The replacement worker removed what the killed one left in the cache.
    cache = Path(server.log.parent / "cache")
    for folder in (cache / "uploads", cache / "work"):
        assert not [p for p in folder.glob(f"{pid}-*")], list(folder.iterdir())
    # ...and what its job's child left: TensorFlow's temporary files too (its TMPDIR is there).
    left = [p for c in children for p in (cache / "work").glob(f"{c}-*")]
    assert not left, left


PUBLISH_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from service.storage import versions
    from service.storage.local import LocalStorage
    from tests.helpers import files, manifest_of

    store, work, version = LocalStorage(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3]
    marker = Path(sys.argv[4])
    uploads = 0
    real_upload = store.upload

    def slow_upload(key, path):  # the test kills this process while it publishes
        global uploads
        uploads += 1
        real_upload(key, path)
        if uploads == 2:
            marker.write_text("mid-publish")
            time.sleep(60)

    store.upload = slow_upload
    parts = files(work, "two")
    base = versions.read_current(store, "shop")
    versions.publish(store, manifest_of(version, parts), parts.values(), set(), base=base, change=True)
""")


def _killed_midway(script: str, args: list[str], marker: Path) -> None:
    """Run `script` in a process of its own and kill it (SIGKILL) once it writes `marker`."""
    child = subprocess.Popen([sys.executable, "-c", script, *args, str(marker)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_a_process_killed_mid_publish_never_leaves_current_on_an_incomplete_version(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    old, new = versions.new_version_id(), versions.new_version_id()
    parts = files(tmp_path / "one", "one")
    versions.publish(
        store, manifest_of(old, parts), parts.values(), set(), base=versions.Pointer(None, None), change=False
    )
    _killed_midway(PUBLISH_SCRIPT, [str(store.root), str(tmp_path / "two"), new], tmp_path / "marker")

    assert versions.read_current(store, "shop").version == old
    assert versions.list_versions(store, "shop") == [old]  # the half-written one has no manifest
    assert len(store.list("shop/blobs/")) == 4 + 2  # it really was half written: two of its blobs
    collected = gc.sweep(store, "shop")  # its blobs are garbage, swept; the published version stays whole
    assert collected.deleted == 2 and len(store.list("shop/blobs/")) == 4


SWEEP_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from service.storage import blobs, gc
    from service.storage.local import LocalStorage

    store, marker = LocalStorage(Path(sys.argv[1])), Path(sys.argv[2])
    real_delete_many = store.delete_many

    def slow_delete_many(keys):  # the test kills this process while it deletes
        real_delete_many(keys[:1])
        marker.write_text("mid-sweep")
        time.sleep(60)

    store.delete_many = slow_delete_many
    gc.sweep(store, "shop")
""")


def test_a_collector_killed_mid_sweep_leaves_every_version_whole_and_builds_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path / "store")
    version = versions.new_version_id()
    parts = files(tmp_path / "one", "one")
    versions.publish(
        store,
        manifest_of(version, parts),
        parts.values(),
        set(),
        base=versions.Pointer(None, None),
        change=False,
    )
    for n in range(3):
        store.write(blob_key("shop", f"{n}" * 64), b"a failed build's leftover")
    monkeypatch.setattr(blobs, "GC_LOCK_S", 1.0)
    _killed_midway(
        SWEEP_SCRIPT.replace("gc.sweep(", "blobs.GC_LOCK_S = 1.0; gc.sweep("),
        [str(store.root)],
        tmp_path / "marker",
    )

    manifest = versions.read_manifest(store, "shop", version)
    assert all(store.exists(blob_key("shop", ref.sha256)) for ref in manifest.blobs())
    assert store.exists("shop/GC_LOCK")  # the dead collector's lock...
    time.sleep(1.2)
    with blobs.lease(store, "shop"):  # ...does not hold a build back once it expires
        pass
    assert gc.sweep(store, "shop").deleted == 2  # and the next sweep finishes the job


DISK_SCRIPT = textwrap.dedent("""
    import json, resource, signal, sys, time
    from pathlib import Path
    from service import create_app

    # Files may not grow past 600 KB from here on: the disk is "full" for anything bigger.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
    app = create_app({"storage_uri": sys.argv[1], "cache_dir": sys.argv[2], "models_dir": sys.argv[3],
                      "warm_on_start": False})
    service = app.extensions["simsvc"]
    results = {}
    for name in ("big", "small"):
        zip_path = Path(sys.argv[2]) / f"{name}.zip"
        job = service.jobs.submit("food", zip_path=zip_path, fine_tune="never")
        while (status := service.jobs.status("food", job.id)).status not in ("succeeded", "failed"):
            time.sleep(0.1)
        results[name] = status.to_dict()
    print(json.dumps(results))
""")


def test_a_full_disk_fails_that_job_only(tmp_path: Path, models_dir: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "uploads").mkdir(parents=True)
    # A photo bigger than the limit, and small Fashion-MNIST PNGs that fit.
    big = demo.jpeg(demo.photo("hubble_deep_field"), quality=100)
    assert len(big) > 600_000
    (cache / "big.zip").write_bytes(
        make_zip({"sky/hubble.jpg": big, "sky/moon.jpg": demo.jpeg(demo.photo("moon"))})
    )
    small = {f"c{i % 2}/{i}.png": demo.png(demo.photo("coins").resize((40, 30))) for i in range(6)}
    (cache / "small.zip").write_bytes(make_zip(small))
    run = subprocess.run(
        [sys.executable, "-c", DISK_SCRIPT, str(tmp_path / "store"), str(cache), str(models_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["big"]["status"] == "failed"
    assert results["big"]["error"].startswith("the disk is full")
    assert results["small"]["status"] == "succeeded", results["small"]
    store = LocalStorage(tmp_path / "store")
    assert versions.read_current(store, "food").version == results["small"]["version"]
