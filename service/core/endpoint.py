"""Endpoint definitions: one TOML file per endpoint under `endpoints/`, read into a frozen dataclass."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.errors import EndpointConfigError

SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
# Names that would shadow the service's own top-level routes.
RESERVED_NAMES = frozenset(
    {"health", "endpoints", "docs", "openapi.json", "train", "static", "worker", "metrics"}
)
METRICS = frozenset({"angular"})


# The duplicate score at or above which two images are duplicates, unless an endpoint file says
# otherwise: on `make bench`'s planted set (part `duplicates`) the report's precision and recall
# are closest to each other here (docs/BENCHMARKS.md#duplicates).
DUPLICATE_THRESHOLD = 0.62
# The query treatment unless an endpoint file says otherwise (QueryConfig): chosen by `make bench`'s
# quality part (docs/BENCHMARKS.md#retrieval-quality-fashion-mnist).
MIRROR_QUERY = False
QUERY_EXPANSION = 0


@dataclass(frozen=True)
class HeadConfig:
    """The `[head]` table of an endpoint file."""

    feature_dim: int = 256
    hidden_dim: int = 1024  # 0: the feature-vector layer sits directly on the input
    thumbnail: int = 16  # side of the thumbnail input; 0: backbone vector only
    # Loss, margin, scale, learning rate, patience and stop_on: chosen by bench/quality.py
    # (docs/BENCHMARKS.md, issue 23): from margin 0.2, scale 16, Adam 1e-3, patience 6 on the loss,
    # P@10 rose 0.850 -> 0.884 with a 3,000-image catalogue and 0.890 -> 0.902 with 10,000; ArcFace
    # and more augmentations did not pay; stopping on retrieval: docs/BENCHMARKS.md.
    loss: str = "cosface"  # or "arcface": the margin added to the angle, not to its cosine
    margin: float = 0.35  # additive margin (on the cosine: CosFace; on the angle: ArcFace)
    scale: float = 30.0  # cosine softmax temperature
    augment: bool = True  # mirrored copies of the training images
    min_images_per_label: int = 5
    holdout_fraction: float = 0.1
    max_epochs: int = 60
    learning_rate: float = 3e-4  # Adam's
    patience: int = 5  # epochs without a better validation score before training stops
    # What early stopping watches on the held-out split: "retrieval" (its mAP@10 searched against
    # the training rows: what the index serves) or "loss" (the margin loss; it bottoms out epochs
    # before retrieval stops improving: docs/BENCHMARKS.md measures both).
    stop_on: str = "retrieval"
    seed: int = 0


@dataclass(frozen=True)
class EncoderSpec:
    """Where an endpoint's image encoder comes from and how to call it."""

    # A TF-Hub handle (https://tfhub.dev/..., https://www.kaggle.com/models/...), a local
    # SavedModel folder (absolute, or relative to the endpoint file), or "offline".
    source: str
    input_size: int
    # SavedModel signature and output key; TF-Hub feature-vector models need neither.
    signature: str | None = None
    output_key: str | None = None

    @property
    def is_remote(self) -> bool:
        return self.source.startswith(("http://", "https://"))


@dataclass(frozen=True)
class QueryConfig:
    """How a query is made better than its plain vector (`[query]`; docs/BENCHMARKS.md measures each):
    `mirror`: the query averaged with its mirror image's vector (one forward pass of two images);
    `expansion`: alpha-query expansion (Radenovic et al., TPAMI 2018): the query plus its
    `expansion` best matches weighted by score**alpha, searched again (0: off)."""

    mirror: bool = MIRROR_QUERY
    expansion: int = QUERY_EXPANSION
    alpha: float = 3.0


@dataclass(frozen=True)
class EndpointSpec:
    """A validated endpoint definition."""

    name: str
    description: str
    encoder: EncoderSpec
    head: HeadConfig
    metric: str
    n_trees: int
    search_k: int
    default_k: int
    max_k: int
    path: Path
    query: QueryConfig = QueryConfig()
    # the duplicate score at or above which two images are duplicates (catalog/descriptor.py)
    duplicate_threshold: float = DUPLICATE_THRESHOLD

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "encoder": {"source": self.encoder.source, "input_size": self.encoder.input_size},
            "feature_dim": self.head.feature_dim,
            "index": {"metric": self.metric, "n_trees": self.n_trees, "search_k": self.search_k},
            "default_k": self.default_k,
            "max_k": self.max_k,
            "duplicate_threshold": self.duplicate_threshold,
            "query": dataclasses.asdict(self.query),
        }


class _Fields:
    """Reads typed fields from a parsed TOML table, naming the file and field in every error."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.seen: set[str] = set()

    def fail(self, field: str, message: str) -> EndpointConfigError:
        return EndpointConfigError(f"{self.path}: {field}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self.seen.add(field)
        table: Any = self.data
        for part in field.split("."):
            if not isinstance(table, dict) or part not in table:
                if default is ...:
                    raise self.fail(field, "is required")
                return default
            table = table[part]
        # bool is an int in Python; a `true` where a number belongs is a mistake.
        if not isinstance(table, kind) or (kind is not bool and isinstance(table, bool)):
            name = kind.__name__ if isinstance(kind, type) else "a number"
            raise self.fail(field, f"must be {name}, got {table!r}")
        return table

    def number(self, field: str, default: float, low: float, high: float) -> float:
        value = self.get(field, (int, float), default)
        if not low <= value <= high:
            raise self.fail(field, f"must be between {low} and {high}, got {value}")
        return float(value)

    def positive_int(self, field: str, default: Any = ..., minimum: int = 1) -> int:
        value: int = self.get(field, int, default)
        if value < minimum:
            raise self.fail(field, f"must be >= {minimum}, got {value}")
        return value

    def check_unknown(self) -> None:
        known_tables = {f.split(".")[0] for f in self.seen}
        for key, value in self.data.items():
            if key not in known_tables:
                raise self.fail(key, "unknown field")
            if isinstance(value, dict):
                for sub in value:
                    if f"{key}.{sub}" not in self.seen:
                        raise self.fail(f"{key}.{sub}", "unknown field")


def parse_endpoint(path: Path) -> EndpointSpec:
    """Read and validate one endpoint file; raise EndpointConfigError naming the file and field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EndpointConfigError(f"{path}: not a readable TOML file: {exc}") from exc

    f = _Fields(path, data)
    name = f.get("name", str, path.stem)
    if not SLUG.match(name):
        raise f.fail("name", f"must be a URL-safe slug (a-z, 0-9, '-'), got {name!r}")
    if name in RESERVED_NAMES:
        raise f.fail("name", f"{name!r} is reserved for the service's own routes")

    source = f.get("encoder.source", str)
    if not source.strip():
        raise f.fail("encoder.source", "must not be empty")
    if not (source == "offline" or source.startswith(("http://", "https://"))):
        # A local SavedModel folder: relative paths are relative to the endpoint file.
        local = Path(source).expanduser()
        source = str(local if local.is_absolute() else (path.parent / local).resolve())
    encoder = EncoderSpec(
        source=source,
        input_size=f.positive_int("encoder.input_size", minimum=8),
        signature=f.get("encoder.signature", str, None),
        output_key=f.get("encoder.output_key", str, None),
    )

    metric = f.get("index.metric", str, "angular")
    if metric not in METRICS:
        raise f.fail("index.metric", f"must be one of {sorted(METRICS)}, got {metric!r}")
    search_k = f.get("index.search_k", int, 0)
    if search_k < -1:
        raise f.fail("index.search_k", f"must be 0 (auto), -1 (Annoy's default) or positive, got {search_k}")

    default_k = f.positive_int("query.default_k", 10)
    max_k = f.positive_int("query.max_k", 100)
    if default_k > max_k:
        raise f.fail("query.default_k", f"must be <= query.max_k ({max_k}), got {default_k}")

    spec = EndpointSpec(
        name=name,
        description=f.get("description", str, ""),
        encoder=encoder,
        head=_head(f),
        metric=metric,
        n_trees=f.positive_int("index.n_trees", 32),
        search_k=search_k,
        default_k=default_k,
        max_k=max_k,
        path=path,
        duplicate_threshold=f.number("duplicates.threshold", DUPLICATE_THRESHOLD, 0.01, 1.0),
        query=QueryConfig(
            mirror=f.get("query.mirror", bool, MIRROR_QUERY),
            expansion=_expansion(f),
            alpha=f.number("query.alpha", QueryConfig.alpha, 0.01, 100.0),
        ),
    )
    f.check_unknown()
    return spec


MAX_EXPANSION = 50  # matches an expanded query adds (each one a vector read; Annoy's n is an int)


def _expansion(f: _Fields) -> int:
    value = f.positive_int("query.expansion", QUERY_EXPANSION, minimum=0)
    if value > MAX_EXPANSION:
        raise f.fail("query.expansion", f"must be <= {MAX_EXPANSION}, got {value}")
    return value


HEAD_LOSSES = ("cosface", "arcface")
HEAD_STOPS = ("retrieval", "loss")


def _loss(f: _Fields) -> str:
    value: str = f.get("head.loss", str, HeadConfig.loss)
    if value not in HEAD_LOSSES:
        raise f.fail("head.loss", f"must be one of {', '.join(HEAD_LOSSES)}, got {value!r}")
    return value


def _head(f: _Fields) -> HeadConfig:
    defaults = HeadConfig()
    return HeadConfig(
        feature_dim=f.positive_int("head.feature_dim", defaults.feature_dim, minimum=2),
        hidden_dim=f.positive_int("head.hidden_dim", defaults.hidden_dim, minimum=0),
        thumbnail=f.positive_int("head.thumbnail", defaults.thumbnail, minimum=0),
        loss=_loss(f),
        margin=f.number("head.margin", defaults.margin, 0.0, 1.0),
        scale=f.number("head.scale", defaults.scale, 1.0, 128.0),
        augment=f.get("head.augment", bool, defaults.augment),
        min_images_per_label=f.positive_int("head.min_images_per_label", defaults.min_images_per_label, 2),
        holdout_fraction=f.number("head.holdout_fraction", defaults.holdout_fraction, 0.01, 0.5),
        max_epochs=f.positive_int("head.max_epochs", defaults.max_epochs),
        learning_rate=f.number("head.learning_rate", defaults.learning_rate, 1e-6, 1.0),
        patience=f.positive_int("head.patience", defaults.patience),
        stop_on=_stop_on(f),
    )


def _stop_on(f: _Fields) -> str:
    value: str = f.get("head.stop_on", str, HeadConfig.stop_on)
    if value not in HEAD_STOPS:
        raise f.fail("head.stop_on", f"must be one of {', '.join(HEAD_STOPS)}, got {value!r}")
    return value


def load_endpoints(folder: Path) -> dict[str, EndpointSpec]:
    """Load every `*.toml` file in `folder`, sorted by name; fail on the first bad one."""
    if not folder.is_dir():
        raise EndpointConfigError(f"{folder}: endpoints folder not found")
    specs: dict[str, EndpointSpec] = {}
    for path in sorted(folder.glob("*.toml")):
        spec = parse_endpoint(path)
        if spec.name in specs:
            raise EndpointConfigError(
                f"{path}: name: {spec.name!r} is already defined by {specs[spec.name].path}"
            )
        specs[spec.name] = spec
    if not specs:
        raise EndpointConfigError(f"{folder}: no endpoint files (*.toml) found")
    return specs
