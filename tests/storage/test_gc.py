"""Garbage collection of blobs: what no retained version references goes, never what a version (or a
build under way) references; raced for real against builds, prunes and rollbacks on both stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.errors import ServiceError, StorageError
from service.storage import Storage, blobs, gc, open_storage, versions
from service.storage.blobs import ref_of
from service.storage.manifest import BlobRef, Manifest, SegmentRef, blob_key


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    if kind == "local":
        return open_storage(str(tmp_path / "store"))
    config: dict[str, Any] = request.getfixturevalue("s3_config")
    return open_storage(config["storage_uri"], endpoint_url=config["s3_endpoint_url"], region="us-east-1")


class Builder:
    """Publishes versions the way trains and changes do (a lease, known blobs not uploaded again):
    each one adds a segment of one row whose image is a blob of its own."""

    def __init__(self, store: Storage, folder: Path) -> None:
        self.store, self.folder, self.n = store, folder, 0
        self.lock = threading.Lock()

    def _segment(self) -> tuple[SegmentRef, list[tuple[Path, BlobRef]]]:
        with self.lock:
            self.n += 1
            n = self.n
        folder = self.folder / f"b{n}"
        folder.mkdir(parents=True)
        image = folder / "image.jpg"
        image.write_bytes(f"image {n}".encode())
        image_ref = ref_of(image)
        np.save(
            folder / "digests.npy", np.frombuffer(bytes.fromhex(image_ref.sha256), np.uint8).reshape(1, 32)
        )
        parts = {}
        for part in ("vectors", "items", "names", "entries"):
            (folder / part).write_bytes(f"{n}:{part}".encode())
            parts[part] = folder / part
        parts["digests"] = folder / "digests.npy"
        refs = {name: ref_of(path) for name, path in parts.items()}
        files = [(parts[name], ref) for name, ref in refs.items()] + [(image, image_ref)]
        return SegmentRef(f"s{n}", 1, 1, refs), files

    def add(self) -> str:
        """A change: the base's segments and one new one."""
        with blobs.lease(self.store, "shop") as held:
            for _ in range(50):
                base = versions.read_current(self.store, "shop")
                before = versions.read_manifest(self.store, "shop", base.version) if base.version else None
                segment, files = self._segment()
                version = versions.new_version_id()
                segments = (*before.segments, segment) if before else (segment,)
                manifest = _manifest(version, segments, before)
                known = {r.sha256 for r in before.blobs()} if before else set()
                try:
                    versions.publish(self.store, manifest, files, known, base=base, change=True, lease=held)
                    return version
                except versions.RebaseError:
                    versions.withdraw(self.store, "shop", version)
        raise AssertionError("too many rebases")


def _manifest(version: str, segments: tuple[SegmentRef, ...], base: Manifest | None) -> Manifest:
    return Manifest(
        endpoint="shop",
        version=version,
        created_at="",
        lineage=base.lineage if base else version,
        base=base.version if base else None,
        encoder={},
        runtime={},
        dim=2,
        metric="angular",
        n_trees=1,
        search_k=0,
        count=len(segments),
        rows=len(segments),
        next_id=len(segments),
        labels={},
        segments=segments,
    )


def assert_whole(store: Storage, manifest: Manifest) -> None:
    """Every blob the version references is there, its segments' images included."""
    present = set(store.list("shop/blobs/"))
    for ref in manifest.blobs():
        assert blob_key("shop", ref.sha256) in present, f"{manifest.version} lost {ref.sha256[:12]}"
    for segment in manifest.segments:
        for image in _images(store, segment.files["digests"].sha256):
            assert blob_key("shop", image) in present, f"{manifest.version} lost an image"


_IMAGES: dict[str, list[str]] = {}  # a segment's images, by its digests blob (immutable)


def _images(store: Storage, digests: str) -> list[str]:
    if digests not in _IMAGES:
        path = Path(f"/tmp/gc-check-{digests}")
        store.download(blob_key("shop", digests), path)
        _IMAGES[digests] = [bytes(row).hex() for row in np.load(path)]
        path.unlink()
    return _IMAGES[digests]


def test_a_prune_deletes_only_what_no_retained_version_lists(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "store"))
    builder = Builder(store, tmp_path / "work")
    first = builder.add()
    builder.add()
    builder.add()
    old = versions.read_manifest(store, "shop", first)
    pruned = versions.prune_versions(store, "shop", keep=1)
    assert [m.version for m in pruned][:1] == [first]
    collected = gc.collect_pruned(store, "shop", pruned)
    # Every segment of the first version is still in the newest one: nothing of it is garbage.
    assert collected.deleted == 0 and not collected.deferred
    assert_whole(store, versions.read_manifest(store, "shop", versions.read_current(store, "shop").version))
    assert all(store.exists(blob_key("shop", r.sha256)) for r in old.blobs())


def test_a_sweep_deletes_blobs_and_images_nothing_references(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "store"))
    builder = Builder(store, tmp_path / "work")
    builder.add()
    keep = builder.add()
    # A version made of the second segment only (the first one's rows are gone, as after a train).
    current = versions.read_manifest(store, "shop", keep)
    lone = _manifest(versions.new_version_id(), current.segments[1:], current)
    versions.publish(
        store,
        lone,
        [],
        {r.sha256 for r in current.blobs()},
        base=versions.read_current(store, "shop"),
        change=True,
    )
    versions.prune_versions(store, "shop", keep=1)
    store.write(blob_key("shop", "f" * 64), b"a failed build's leftover")
    before = len(store.list("shop/blobs/"))
    swept = gc.sweep(store, "shop")
    assert swept.deleted == 5 + 1 + 1  # the first segment's 5 parts, its image, the leftover
    assert len(store.list("shop/blobs/")) == before - swept.deleted
    assert_whole(store, lone)


def test_a_live_lease_defers_collection_and_an_expired_one_does_not(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "store"))
    store.write(blob_key("shop", "f" * 64), b"garbage")
    with blobs.lease(store, "shop"):
        assert gc.sweep(store, "shop").deferred
    assert store.exists(blob_key("shop", "f" * 64))
    store.write("shop/leases/1-crashed", b"")  # a build that died a long time ago
    assert gc.sweep(store, "shop").deleted == 1
    assert store.list("shop/leases/") == []  # its lease is cleared too


def test_a_build_waits_for_a_collection_and_gives_up_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_storage(str(tmp_path / "store"))
    monkeypatch.setattr(blobs, "LEASE_WAIT_S", 0.3)
    store.write("shop/GC_LOCK", b'{"started": %f, "expires": %f}' % (time.time(), time.time() + 600))
    with pytest.raises(StorageError, match="garbage collection"), blobs.lease(store, "shop"):
        pass
    assert store.list("shop/leases/") == []  # it left no lease behind


def test_a_build_that_outlasts_its_lease_keeps_it_by_renewing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blobs, "LEASE_S", 2.0)  # 300 s in production; renewed every third of it
    store = open_storage(str(tmp_path / "store"))
    store.write(blob_key("shop", "f" * 64), b"garbage")
    with blobs.lease(store, "shop") as held:
        first = held.key
        time.sleep(4.5)  # more than two lifetimes of a lease never renewed
        assert held.key != first and store.list("shop/leases/") == [held.key]
        assert gc.sweep(store, "shop").deferred
        held.check()
    assert store.exists(blob_key("shop", "f" * 64)) and store.list("shop/leases/") == []


def test_a_build_whose_lease_lapsed_publishes_nothing(tmp_path: Path) -> None:
    store = open_storage(str(tmp_path / "store"))
    builder = Builder(store, tmp_path / "builds")
    first = builder.add()
    with blobs.lease(store, "shop") as held:
        store.delete(held.key)  # a collector judged it expired (its clock ahead of ours) and swept
        segment, files = builder._segment()
        manifest = _manifest(versions.new_version_id(), (segment,), None)
        pointer = versions.read_current(store, "shop")
        with pytest.raises(StorageError, match="lapsed"):
            versions.publish(store, manifest, files, set(), base=pointer, change=True, lease=held)
    assert versions.read_current(store, "shop").version == first


def test_a_sweep_marks_before_it_locks_and_keeps_what_was_published_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_storage(str(tmp_path / "store"))
    builder = Builder(store, tmp_path / "builds")
    builder.add()
    monkeypatch.setattr(blobs, "LEASE_WAIT_S", 0.5)  # a build waiting on a marking sweep would fail
    marking, go = threading.Event(), threading.Event()
    mark = gc._marked

    def slow_mark(storage: Storage, endpoint: str, manifests: list[Manifest], seen: set[str]) -> set[str]:
        if not marking.is_set():  # the first pass: a large catalog's digests take a while to read
            marking.set()
            go.wait(10)
        return mark(storage, endpoint, manifests, seen)

    monkeypatch.setattr(gc, "_marked", slow_mark)
    swept: list[gc.Collected] = []
    sweeper = threading.Thread(target=lambda: swept.append(gc.sweep(store, "shop")))
    sweeper.start()
    assert marking.wait(5)
    added = builder.add()  # published while the sweep marks: not held back, and not swept
    go.set()
    sweeper.join()
    assert not swept[0].deferred
    assert_whole(store, versions.read_manifest(store, "shop", added))


# --- real races --------------------------------------------------------------------------------------

ROUNDS = 8


def _race(*actions: Any) -> None:
    barrier = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Any) -> None:
        barrier.wait()
        try:
            action()
        except ServiceError:
            pass  # refused cleanly (a rollback to a version deleted meanwhile...)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _retained_are_whole(store: Storage) -> None:
    for manifest in gc.retained(store, "shop"):
        assert_whole(store, manifest)


@pytest.mark.slow  # many rounds of threads, on both stores
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_prune_and_sweep_racing_adds_never_delete_what_a_version_references(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    builder = Builder(store, tmp_path / "work")
    builder.add()
    for _ in range(ROUNDS):
        _race(
            builder.add,
            builder.add,
            lambda: gc.collect_pruned(store, "shop", versions.prune_versions(store, "shop", keep=2)),
            lambda: gc.sweep(store, "shop"),
        )
        _retained_are_whole(store)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_delete_version_rollback_and_add_racing_leave_every_version_whole(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    builder = Builder(store, tmp_path / "work")
    for _ in range(ROUNDS):
        old = builder.add()
        builder.add()

        def delete(old: str = old) -> None:
            gc.collect_pruned(store, "shop", [versions.delete_version(store, "shop", old)])

        _race(
            lambda old=old: versions.rollback(store, "shop", old),
            delete,
            builder.add,
            lambda: gc.sweep(store, "shop"),
        )
        current = versions.read_current(store, "shop").version
        assert current is not None and current in versions.list_versions(store, "shop")
        _retained_are_whole(store)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_pruning_racing_a_rollback_never_deletes_what_current_names(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    builder = Builder(store, tmp_path / "work")
    for _ in range(ROUNDS):
        old = builder.add()
        builder.add()
        _race(
            lambda old=old: versions.rollback(store, "shop", old),
            lambda: gc.collect_pruned(store, "shop", versions.prune_versions(store, "shop", keep=1)),
        )
        current = versions.read_current(store, "shop").version
        assert current is not None and current in versions.list_versions(store, "shop")
        assert_whole(store, versions.read_manifest(store, "shop", current))
