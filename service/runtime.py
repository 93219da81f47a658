"""The service's parts for one process: settings, endpoints, storage, serving registry, job runner."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import training, versions
from .config import Settings
from .endpoint import EndpointSpec, load_endpoints
from .errors import ItemNotFoundError
from .jobs import JobRunner, JobStore
from .query import check_item
from .serving import EndpointRuntime, Registry
from .storage import KeyNotFoundError, Storage, open_storage
from .tfruntime import configure_threads

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    specs: dict[str, EndpointSpec]
    storage: Storage
    registry: Registry
    jobs: JobRunner
    uploads_dir: Path

    def image_key(self, runtime: EndpointRuntime, item_id: int, version: str | None) -> str:
        """Storage key of an item's original image, in the served version or a named one."""
        loaded = runtime.current()
        if version is None or version == loaded.version:
            check_item(loaded, item_id)
            image = loaded.items[item_id]["image"]
            version = loaded.version
        else:
            image = _item_images(self.storage, runtime.spec.name, version).get(str(item_id))
            if image is None:
                raise ItemNotFoundError(f"no item {item_id} in {runtime.spec.name} version {version}")
        return versions.version_prefix(runtime.spec.name, version) + image

    def close(self) -> None:
        self.registry.stop()
        self.jobs.shutdown()


@lru_cache(maxsize=8)
def _item_images(storage: Storage, endpoint: str, version: str) -> dict[str, str]:
    """id -> image key of an older version (for image URLs handed out before a swap)."""
    prefix = versions.version_prefix(endpoint, version)
    if not versions.SAFE_VERSION.match(version) or not storage.exists(prefix + versions.MANIFEST):
        return {}  # only complete, published versions
    try:
        meta = json.loads(storage.read(versions.version_prefix(endpoint, version) + "metadata.json"))
    except KeyNotFoundError:
        return {}
    return {i: item["image"] for i, item in meta.items()}


def build_service(settings: Settings) -> Service:
    """Assemble the parts; endpoint files are validated here, so a bad one stops the start-up."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    configure_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
    specs = load_endpoints(settings.endpoints_dir)
    storage = open_storage(
        settings.storage_uri, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
    )
    uploads = settings.cache_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)

    def run_training(
        endpoint: str, zip_path: Path, on_progress: training.ProgressFn, version: str, fine_tune: str
    ) -> training.TrainResult:
        return training.train(specs[endpoint], zip_path, storage, settings, on_progress, version, fine_tune)

    return Service(
        settings=settings,
        specs=specs,
        storage=storage,
        registry=Registry(specs, storage, settings),
        jobs=JobRunner(JobStore(storage), run_training),
        uploads_dir=uploads,
    )
