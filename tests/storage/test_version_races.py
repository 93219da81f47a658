"""Version operations on one endpoint raced against each other, many rounds, on both stores:
CURRENT must never end up naming a deleted version."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from service.core.errors import ServiceError
from service.storage import Storage, open_storage, versions

from .test_versions import staged

# Real races: many threads against the local store and moto's S3, repeated.
pytestmark = pytest.mark.slow

ROUNDS = 25


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Storage:
    if kind == "local":
        return open_storage(str(tmp_path / "store"))
    config: dict[str, Any] = request.getfixturevalue("s3_config")
    return open_storage(config["storage_uri"], endpoint_url=config["s3_endpoint_url"], region="us-east-1")


def _publish(store: Storage, tmp_path: Path, n: int) -> str:
    version = versions.new_version_id()
    versions.publish(store, "shop", version, staged(tmp_path, f"stage{n}"), {"count": 1})
    return version


def _race(*actions: Any) -> list[BaseException | None]:
    barrier = threading.Barrier(len(actions))
    outcomes: list[BaseException | None] = [None] * len(actions)

    def run(i: int) -> None:
        barrier.wait()
        try:
            actions[i]()
        except ServiceError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _assert_current_is_whole(store: Storage) -> str:
    current = versions.read_current(store, "shop").version
    assert current is not None
    prefix = versions.version_prefix("shop", current)
    for name in (versions.MANIFEST, *versions.SERVING_FILES):
        assert store.exists(prefix + name), f"CURRENT names {current}, whose {name} is gone"
    return current


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_rollback_racing_a_delete_of_the_same_version_never_leaves_current_dangling(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    for n in range(ROUNDS):
        old = _publish(store, tmp_path, 2 * n)
        _publish(store, tmp_path, 2 * n + 1)
        rolled, deleted = _race(
            lambda old=old: versions.rollback(store, "shop", old),
            lambda old=old: versions.delete_version(store, "shop", old),
        )
        current = _assert_current_is_whole(store)
        # Never both "succeeded": either the rollback won (and the delete was refused) or not.
        assert rolled is not None or deleted is not None
        if rolled is None:
            assert current == old


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_pruning_racing_a_rollback_never_deletes_what_current_names(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = _store(kind, tmp_path, request)
    for n in range(ROUNDS):
        old = _publish(store, tmp_path, 2 * n)
        _publish(store, tmp_path, 2 * n + 1)
        _race(
            lambda old=old: versions.rollback(store, "shop", old),
            lambda: versions.prune_versions(store, "shop", keep=1),
        )
        _assert_current_is_whole(store)
