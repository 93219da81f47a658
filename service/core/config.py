"""Settings: profile defaults, then environment variables, then explicit overrides (tests)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]  # service/core/config.py -> the repository

# Each profile is a set of defaults; any setting can still be given on its own.
PROFILES: dict[str, dict[str, Any]] = {
    # One machine, no network: files under ./data, the bundled offline encoder.
    "local": {
        "storage_uri": f"file://{ROOT / 'data'}",
        "encoder_mode": "offline",
        "trusted_hosts": "127.0.0.1,localhost,::1,[::1]",
    },
    # Elastic Beanstalk: STORAGE_URI must name the bucket; encoders come from TF-Hub (or its mirror).
    "aws": {"storage_uri": "", "encoder_mode": "mirror", "log_format": "json"},
}

# hub: download TF-Hub handles; mirror: load them from the bucket's mirror (never tfhub.dev);
# offline: serve every remote handle with the bundled offline encoder.
ENCODER_MODES = ("hub", "mirror", "offline")
ROLES = ("web", "worker")
ENCODER_RUNTIMES = ("litert", "tensorflow")


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. Environment variable = field name in upper case."""

    profile: str = "local"
    # file:///abs/path, a plain path, or s3://bucket/prefix
    storage_uri: str = ""
    # An S3-compatible endpoint (MinIO, a local test server); boto3's AWS_ENDPOINT_URL_S3 also works.
    s3_endpoint_url: str = ""
    # The bucket's region; empty: boto3's chain (AWS_REGION / AWS_DEFAULT_REGION, instance metadata).
    s3_region: str = ""
    # How long the pre-signed image URLs in results stay valid.
    signed_url_expiry_s: int = 3600
    # Published versions kept per endpoint; older ones are deleted after each successful publish.
    keep_versions: int = 5
    # Compaction (training/compaction.py): a size tier holding more segments than this is merged;
    # so is a segment with more than this share of its rows deleted, or an overlay of edits past
    # this many KB. A change that leaves the catalog over a bound queues a compaction job.
    compact_max_segments: int = 8
    compact_deleted_share: float = 0.2
    compact_overlay_kb: int = 512
    # web: serve queries and take training uploads; worker: also run jobs the SQS daemon delivers.
    service_role: str = "web"
    # An SQS queue URL: the web tier queues training jobs there for the worker tier.
    job_queue_url: str = ""
    # On the worker tier, a train or add of more images than this is split into shards of this
    # many images, one SQS message each, embedded by every worker instance (docs/CAPACITY.md).
    shard_images: int = 5000
    sqs_endpoint_url: str = ""  # like S3_ENDPOINT_URL, for SQS (boto3's AWS_ENDPOINT_URL_SQS works too)
    # Attempts per job before it is marked failed (match the queue's maxReceiveCount).
    job_max_attempts: int = 3
    # Lifetime of the pre-signed upload URLs from POST /<endpoint>/uploads.
    upload_url_expiry_s: int = 3600
    # Largest zip a job takes from S3 (uploads that bypass the web tier).
    max_source_zip_mb: int = 51_200
    # Where mirrored TF-Hub encoders live (s3://...); empty: <STORAGE_URI>/encoders when on S3.
    encoder_mirror_uri: str = ""
    # Bearer tokens (api/auth.py). With none set, writes are open: only for one-machine development.
    admin_token: str = ""
    endpoint_tokens: str = ""  # JSON: {"fashion": "<token>", ...}
    query_token: str = ""  # set to make queries need a token too
    endpoints_dir: Path = ROOT / "endpoints"
    # hub: download TF-Hub handles (cached in TFHUB_CACHE_DIR); mirror: from the bucket's copy;
    # offline: the bundled encoder
    encoder_mode: str = "offline"
    models_dir: Path = ROOT / "models"
    # litert: each version's encoder is converted to TFLite and served by LiteRT when it converts
    # and agrees with TensorFlow (else TensorFlow serves it, and says why); tensorflow: never convert.
    encoder_runtime: str = "litert"
    # The least cosine between a converted model's vector and TensorFlow's, per image checked.
    converted_min_cosine: float = 0.9999
    # A trained head is fused with the converted backbone into one TFLite model (training/fuse.py),
    # so a query is one invoke; 0: none is made, and versions that have one are served with the
    # head in NumPy after the backbone's invoke (the same answers, to 1e-4).
    fuse_head: bool = True
    cache_dir: Path = ROOT / "cache"
    tfhub_cache_dir: Path | None = None
    # Seconds between checks of each endpoint's CURRENT pointer.
    watch_interval_s: float = 2.0
    # Load encoders and indexes in the background as soon as a worker starts.
    warm_on_start: bool = True
    max_upload_mb: int = 1024
    max_image_mb: int = 20
    max_image_pixels: int = 40_000_000
    # Images in one /infer request (multipart parts); more is a 413.
    max_infer_images: int = 32
    # Run each training job in a child process: the web worker never loads TensorFlow, and the job's
    # memory goes back when it ends. False: in a thread of the worker (tests, debugging).
    train_in_child: bool = True
    # A training job that runs longer than this fails (its time, not its images, is the limit).
    job_max_s: float = 6 * 3600
    # An image that takes longer than this to decode is skipped (the budgets above make it rare).
    image_decode_max_s: float = 10.0
    # Host names the service answers to (comma-separated; ".example.com" also matches its
    # subdomains): the Host header builds every URL it returns. Empty: any host (behind a proxy
    # that checks it). The local profile answers only to this machine's names.
    trusted_hosts: str = ""
    max_zip_entries: int = 100_000
    max_zip_uncompressed_mb: int = 20_480
    max_zip_ratio: float = 100.0  # expanded / compressed size of one entry: more is a zip bomb
    # Photos one item (the metadata file's `item` column) may have: `similar` searches with each.
    max_photos_per_item: int = 50
    # Image formats accepted for training and queries (of JPEG, PNG, WEBP, BMP, GIF).
    image_formats: str = "JPEG,PNG,WEBP,BMP,GIF"
    # A running job whose status has not moved for this long is reported failed (its worker died).
    job_stale_s: float = 600.0
    encode_batch_size: int = 32  # the raw encoder's best batch here (docs/BENCHMARKS.md)
    # Threads decoding training images while the encoder runs; on 2 cores one is fastest (the
    # encoder wants both cores), measured by bench/perf.py.
    decode_threads: int = max(1, (os.cpu_count() or 2) // 2)
    # How long a forward pass may wait, under load, for the requests it expects (encoders/batching.py).
    batch_window_ms: float = 3.0
    # Thread pools per process, TensorFlow's and LiteRT's (intra-op: threads per forward pass);
    # 0 = the runtime's default (all cores).
    tf_intra_op_threads: int = 0
    tf_inter_op_threads: int = 0
    # A web worker's LiteRT pass that finds no other running on the machine uses every core, not
    # its share (core/inflight.py): a lone query answers sooner; under load nothing changes.
    lone_pass_all_cores: bool = True
    log_level: str = "INFO"
    # text, or json: one JSON object a line (time, level, logger, message, pid, request_id)
    log_format: str = "text"

    @classmethod
    def load(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Build settings: profile defaults, then the environment, then `overrides`."""
        environ = os.environ if environ is None else environ
        overrides = {k.lower(): v for k, v in (overrides or {}).items()}
        profile = str(overrides.get("profile") or environ.get("SERVICE_PROFILE") or "local")
        if profile not in PROFILES:
            raise ValueError(f"SERVICE_PROFILE must be one of {sorted(PROFILES)}, got {profile!r}")

        values: dict[str, Any] = {"profile": profile, **PROFILES[profile]}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            if name != "profile" and name.upper() in environ:
                values[name] = environ[name.upper()]
        values.update(overrides)
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        return cls(**{k: _coerce(fields[k].type, k, v) for k, v in values.items()}).validated()

    def validated(self) -> Settings:
        if self.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"ENCODER_MODE must be one of {ENCODER_MODES}, got {self.encoder_mode!r}")
        if self.encoder_runtime not in ENCODER_RUNTIMES:
            raise ValueError(
                f"ENCODER_RUNTIME must be one of {ENCODER_RUNTIMES}, got {self.encoder_runtime!r}"
            )
        if not 0 < self.converted_min_cosine <= 1:
            raise ValueError(f"CONVERTED_MIN_COSINE must be in (0, 1], got {self.converted_min_cosine}")
        if not self.storage_uri:
            raise ValueError("STORAGE_URI is required (e.g. s3://my-bucket/simsvc or file:///srv/data)")
        if self.job_queue_url and urlparse(self.storage_uri).scheme != "s3":
            raise ValueError("JOB_QUEUE_URL needs an s3:// STORAGE_URI: the worker tier reads the zips there")
        if self.service_role not in ROLES:
            raise ValueError(f"SERVICE_ROLE must be one of {ROLES}, got {self.service_role!r}")
        if self.query_token and not (self.admin_token or self.endpoint_tokens):
            raise ValueError("QUERY_TOKEN without ADMIN_TOKEN (or ENDPOINT_TOKENS) would leave writes open")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.profile == "aws" and not (self.admin_token or self.endpoint_tokens):
            raise ValueError("the aws profile needs ADMIN_TOKEN (or ENDPOINT_TOKENS): writes are never open")
        unknown = self.allowed_formats - {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
        if unknown or not self.allowed_formats:
            raise ValueError(
                f"IMAGE_FORMATS must list some of JPEG, PNG, WEBP, BMP, GIF; got {self.image_formats!r}"
            )
        if (
            self.compact_max_segments < 1
            or not 0 < self.compact_deleted_share <= 1
            or self.compact_overlay_kb < 1
        ):
            raise ValueError(
                "COMPACT_MAX_SEGMENTS and COMPACT_OVERLAY_KB must be at least 1, "
                "COMPACT_DELETED_SHARE in (0, 1]"
            )
        if self.keep_versions < 1:
            raise ValueError(f"KEEP_VERSIONS must be at least 1, got {self.keep_versions}")
        if self.shard_images < 1:
            raise ValueError(f"SHARD_IMAGES must be at least 1, got {self.shard_images}")
        return self

    @property
    def allowed_formats(self) -> frozenset[str]:
        return frozenset(f.strip().upper() for f in self.image_formats.split(",") if f.strip())

    @property
    def hub_cache(self) -> Path:
        return self.tfhub_cache_dir or self.cache_dir / "tfhub"


def _coerce(annotation: Any, name: str, value: Any) -> Any:
    """Turn an environment string into the field's type; explicit values pass through checked."""
    kind = str(annotation)
    if isinstance(value, str):
        text = value.strip()
        try:
            if kind == "bool":
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                return text.lower() in ("1", "true", "yes", "on")
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
        except ValueError:
            expected = {"bool": "true or false", "int": "an integer", "float": "a number"}[kind]
            raise ValueError(f"{name.upper()} must be {expected}, got {value!r}") from None
        if "Path" in kind:
            return Path(text).expanduser().resolve() if text else None
        return text
    if "Path" in kind and value is not None:
        return Path(value)
    return value


def parse_token_settings(admin: str, endpoint_tokens: str, query: str, known: list[str]) -> dict[str, str]:
    """Check the token settings and return ENDPOINT_TOKENS parsed (a bad value stops the start-up:
    the web app's and every CLI command's)."""
    endpoints: dict[str, str] = {}
    if endpoint_tokens.strip():
        try:
            endpoints = json.loads(endpoint_tokens)
        except ValueError:
            raise ValueError('ENDPOINT_TOKENS must be a JSON object {"<endpoint>": "<token>"}') from None
        if not isinstance(endpoints, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in endpoints.items()
        ):
            raise ValueError("ENDPOINT_TOKENS must map endpoint names to non-empty strings")
        unknown = sorted(set(endpoints) - set(known))
        if unknown:
            raise ValueError(f"ENDPOINT_TOKENS names unknown endpoints: {', '.join(unknown)}")
    for name, token in [("ADMIN_TOKEN", admin), ("QUERY_TOKEN", query), *endpoints.items()]:
        if token and len(token) < 16:
            raise ValueError(f"the token for {name} is too short (16 characters at least)")
    return endpoints
