"""Command line: serve, train, query, demo, build-encoder (python -m service --help)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from service.core.config import ROOT, Settings

DESCRIPTION = "Image-similarity service. Settings come from environment variables (see README)."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the web service with the Procfile's gunicorn command")

    train = commands.add_parser("train", help="train an endpoint from a zip and publish it")
    train.add_argument("endpoint")
    train.add_argument("zip", type=Path)
    train.add_argument(
        "--fine-tune",
        choices=("auto", "always", "never"),
        default="auto",
        help="train a feature-vector head on the labels (default: auto)",
    )

    query = commands.add_parser("query", help="the most similar indexed images to an image")
    query.add_argument("endpoint")
    query.add_argument("image", type=Path)
    query.add_argument("-k", type=int, default=None, help="number of results")

    score = commands.add_parser("evaluate", help="precision@1/@10 and mAP@10 of the served version")
    score.add_argument("endpoint")
    score.add_argument("zip", type=Path, help="a labelled zip (folders = labels) of query images")
    score.add_argument("-k", type=int, default=10)

    demo = commands.add_parser("demo", help="train every untrained endpoint on the demo images")
    demo.add_argument("--force", action="store_true", help="retrain even if already published")

    history = commands.add_parser("versions", help="list or roll back an endpoint's versions")
    actions = history.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the complete published versions, oldest first")
    listing.add_argument("endpoint")
    back = actions.add_parser("rollback", help="point CURRENT at an earlier version")
    back.add_argument("endpoint")
    back.add_argument("version")

    models = commands.add_parser("encoders", help="manage the endpoints' TF-Hub encoders")
    model_actions = models.add_subparsers(dest="action", required=True)
    model_actions.add_parser(
        "mirror", help="download every endpoint's TF-Hub handle and copy it into the bucket's mirror"
    )

    commands.add_parser("build-encoder", help="build the offline encoder into MODELS_DIR")
    commands.add_parser("endpoints", help="validate and list the endpoint files")

    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:  # noqa: BLE001 - a CLI prints the reason, not a traceback
        from service.core.errors import EndpointConfigError, ServiceError

        if isinstance(exc, ServiceError | EndpointConfigError | ValueError):
            print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
            return 2
        raise


def serve(args: argparse.Namespace) -> int:
    """Exec the Procfile's `web:` command, so local runs serve exactly what Elastic Beanstalk does."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            argv = shlex.split(line[len("web:") :])
            os.chdir(ROOT)
            gunicorn = Path(sys.executable).with_name(argv[0])
            os.execv(gunicorn if gunicorn.exists() else argv[0], argv)
    print("error: no web: line in Procfile", file=sys.stderr)
    return 2


def train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.catalog import training
    from service.serving.runtime import build_service

    service = build_service(Settings.load({"warm_on_start": False}))
    if args.endpoint not in service.specs:
        print(f"error: no endpoint {args.endpoint!r} (have: {', '.join(service.specs)})", file=sys.stderr)
        return 2
    bars: dict[str, tqdm] = {}

    def progress(p: training.Progress) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[p.stage] = tqdm(total=p.total, desc=p.stage, unit="img", file=sys.stderr)
        bar.total = p.total
        bar.n = p.done
        bar.refresh()

    result = training.train(
        service.specs[args.endpoint],
        args.zip,
        service.storage,
        service.settings,
        progress,
        fine_tune=args.fine_tune,
    )
    for bar in bars.values():
        bar.close()
    print(
        json.dumps(
            {
                "version": result.version,
                "counts": result.counts,
                "evaluation": result.evaluation,
                "skipped": [s.__dict__ for s in result.skipped],
            },
            indent=2,
        )
    )
    return 0


def query(args: argparse.Namespace) -> int:
    from service.serving import query as q
    from service.serving.runtime import build_service

    service = build_service(Settings.load({"warm_on_start": False}))
    runtime = service.registry.get(args.endpoint)
    k = q.check_k(runtime.spec, args.k)
    loaded = runtime.current()

    def image_path(loaded: q.LoadedVersion, item_id: int, photo: int, item: dict[str, Any]) -> str | None:
        key = service.storage.local_path(f"{args.endpoint}/versions/{loaded.version}/{item['image']}")
        return key.as_uri() if key else None

    results = q.search_images(
        loaded, [(args.image.name, args.image.read_bytes())], k, service.settings.max_image_pixels, image_path
    )
    print(
        json.dumps(
            {"endpoint": args.endpoint, "version": loaded.version, "results": results[0]},
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from service.serving import query as q
    from service.serving.runtime import build_service

    service = build_service(Settings.load({"warm_on_start": False}))
    loaded = service.registry.get(args.endpoint).current()
    print(json.dumps(q.evaluate_zip(loaded, args.zip, service.settings, args.k), indent=2))
    return 0


def demo(args: argparse.Namespace) -> int:
    from service.catalog import demo as demo_data
    from service.catalog import training
    from service.serving.runtime import build_service
    from service.storage import versions

    service = build_service(Settings.load({"warm_on_start": False}))
    zips = demo_data.demo_zips(service.settings.cache_dir / "demo")
    for name, spec in service.specs.items():
        current = versions.read_current(service.storage, name).version
        if current and not args.force:
            print(f"{name}: already serving version {current}")
            continue
        zip_path = zips.get(name, zips["food"])
        result = training.train(spec, zip_path, service.storage, service.settings)
        print(f"{name}: trained {result.count} images from {zip_path.name} -> {result.version}")
    return 0


def versions_command(args: argparse.Namespace) -> int:
    from service.serving.runtime import build_service
    from service.storage import versions

    service = build_service(Settings.load({"warm_on_start": False}))
    service.registry.get(args.endpoint)  # an unknown endpoint is an error, not an empty list
    if args.action == "rollback":
        versions.rollback(service.storage, args.endpoint, args.version)
        print(f"{args.endpoint}: CURRENT now names {args.version}")
        return 0
    current = versions.read_current(service.storage, args.endpoint).version
    print(f"{'':2}{'version':32} {'count':>8}  created_at")
    for version in versions.list_versions(service.storage, args.endpoint):
        manifest = versions.read_manifest(service.storage, args.endpoint, version)
        mark = "*" if version == current else " "
        print(f"{mark:2}{version:32} {manifest.get('count', '?'):>8}  {manifest.get('created_at', '?')}")
    return 0


def encoders_command(args: argparse.Namespace) -> int:
    """Mirror each remote handle: download it from TF-Hub here, upload it to the store's mirror."""
    from service import encoders
    from service.encoders import mirror
    from service.serving.runtime import build_service
    from service.storage import encoder_mirror

    service = build_service(Settings.load({"warm_on_start": False}))
    target = encoder_mirror(service.settings, service.storage)
    if target is None:
        print("error: the mirror needs an s3:// STORAGE_URI or ENCODER_MIRROR_URI", file=sys.stderr)
        return 2
    for name, spec in service.specs.items():
        if not spec.encoder.is_remote:
            print(f"{name}: {spec.encoder.source} is not a TF-Hub handle; nothing to mirror")
            continue
        folder = encoders.fetch_handle(spec.encoder.source, service.settings.hub_cache)
        prefix = mirror.upload(target, spec.encoder.source, folder)
        print(f"{name}: {spec.encoder.source} -> {target.uri}/{prefix}")
    return 0


def build_encoder(args: argparse.Namespace) -> int:
    from service.encoders.offline import build

    settings = Settings.load({"warm_on_start": False})
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    print(build(settings.models_dir))
    return 0


def endpoints(args: argparse.Namespace) -> int:
    from service.core.endpoint import load_endpoints

    for spec in load_endpoints(Settings.load().endpoints_dir).values():
        print(json.dumps(spec.summary()))
    return 0


COMMANDS = {
    "serve": serve,
    "train": train,
    "query": query,
    "evaluate": evaluate,
    "demo": demo,
    "versions": versions_command,
    "encoders": encoders_command,
    "build-encoder": build_encoder,
    "endpoints": endpoints,
}

if __name__ == "__main__":
    sys.exit(main())
