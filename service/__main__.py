"""Command line: serve, train, query, evaluate, versions, encoders, build-encoder, endpoints (python -m
service --help). Every command is one call to `Service` (service/application), as the HTTP views are."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.config import ROOT, Settings

if TYPE_CHECKING:
    from service.application.service import Service

DESCRIPTION = "Image-similarity service. Settings come from environment variables (docs/CONFIGURATION.md)."


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

    twins = commands.add_parser("duplicates", help="groups of duplicate images in the served version")
    twins.add_argument("endpoint")
    twins.add_argument(
        "--threshold", type=float, default=None, help="at or above: duplicates (default: the endpoint's)"
    )
    twins.add_argument("--csv", type=Path, default=None, help="write the groups as CSV to this file")

    history = commands.add_parser("versions", help="list or roll back an endpoint's versions")
    actions = history.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the complete published versions, oldest first")
    listing.add_argument("endpoint")
    back = actions.add_parser("rollback", help="point CURRENT at an earlier version")
    back.add_argument("endpoint")
    back.add_argument("version")

    for name, help_text in (
        ("migrate", "convert an endpoint's current version to content-addressed storage (once)"),
        ("gc", "delete the blobs of an endpoint that no retained version references"),
    ):
        upkeep = commands.add_parser(name, help=help_text)
        upkeep.add_argument("endpoint")

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
    except Exception as exc:  # a CLI prints the reason, not a traceback
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


def _service() -> Service:
    from service.application.wiring import build_service

    return build_service(Settings.load({"warm_on_start": False}))


def train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    service = _service()
    if args.endpoint not in service.specs:
        print(f"error: no endpoint {args.endpoint!r} (have: {', '.join(service.specs)})", file=sys.stderr)
        return 2
    bars: dict[str, tqdm] = {}

    def progress(p: Any) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[p.stage] = tqdm(total=p.total, desc=p.stage, unit="img", file=sys.stderr)
        bar.total = p.total
        bar.n = p.done
        bar.refresh()

    result = service.train_now(args.endpoint, args.zip, args.fine_tune, progress)
    for bar in bars.values():
        bar.close()
    shown = {
        "version": result.version,
        "counts": result.counts,
        "evaluation": result.evaluation,
        "skipped": [s.__dict__ for s in result.skipped],
    }
    print(json.dumps(shown, indent=2))
    return 0


def query(args: argparse.Namespace) -> int:
    found = _service().query_file(args.endpoint, args.image, args.k)
    shown = {"endpoint": found.endpoint, "version": found.version, "results": found.results[0]}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    print(json.dumps(_service().evaluate(args.endpoint, args.zip, args.k), indent=2))
    return 0


def duplicates(args: argparse.Namespace) -> int:
    service = _service()
    found = service.duplicates_now(args.endpoint, args.threshold)
    if args.csv is None:
        print(json.dumps(found, indent=2, ensure_ascii=False))
        return 0
    args.csv.write_text(service.duplicates_csv(found))
    print(f"{len(found['groups'])} groups of duplicates in {args.endpoint} {found['version']} -> {args.csv}")
    return 0


def versions_command(args: argparse.Namespace) -> int:
    service = _service()
    if args.action == "rollback":
        service.rollback(args.endpoint, args.version)
        print(f"{args.endpoint}: CURRENT now names {args.version}")
        return 0
    listed = service.versions_of(args.endpoint)
    print(f"{'':2}{'version':32} {'count':>8}  created_at")
    for v in listed.versions:
        mark = "*" if v.current else " "
        print(f"{mark:2}{v.version:32} {v.count if v.count is not None else '?':>8}  {v.created_at or '?'}")
    return 0


def encoders_command(args: argparse.Namespace) -> int:
    """Mirror each remote handle: download it from TF-Hub here, upload it to the store's mirror."""
    for line in _service().mirror_encoders():
        print(line)
    return 0


def migrate(args: argparse.Namespace) -> int:
    outcome = _service().migrate(args.endpoint)
    if not outcome.published:
        print(f"{args.endpoint}: nothing to migrate ({outcome.version or 'no version'} is in format 2)")
    else:
        print(f"{args.endpoint}: migrated -> {outcome.version} ({outcome.count} items)")
    return 0


def collect_garbage(args: argparse.Namespace) -> int:
    collected = _service().collect_garbage(args.endpoint)
    if collected.deferred:
        print(f"{args.endpoint}: a build is under way; nothing was deleted (try again)")
        return 1
    print(f"{args.endpoint}: deleted {collected.deleted} blobs no retained version references")
    return 0


def build_encoder(args: argparse.Namespace) -> int:
    from service.application.wiring import build_offline_encoder

    print(build_offline_encoder(Settings.load({"warm_on_start": False})))
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
    "duplicates": duplicates,
    "versions": versions_command,
    "encoders": encoders_command,
    "build-encoder": build_encoder,
    "migrate": migrate,
    "gc": collect_garbage,
    "endpoints": endpoints,
}

if __name__ == "__main__":
    sys.exit(main())
