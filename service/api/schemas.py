"""Marshmallow schemas: what each route takes and returns (they also make /openapi.json)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, post_dump, validate


def on_duplicate_field() -> fields.String:
    """A job's `on_duplicate` (the form of /train and /items, and /train's JSON)."""
    return fields.String(
        load_default="allow",
        validate=validate.OneOf(["allow", "flag", "skip"]),
        metadata={
            "description": "New images that copy an item (the catalogue's, for /items; an older "
            "one of the same zip, for both) at or above the endpoint's duplicate threshold: allow "
            "(add them), flag (add them, listed in the job's counts.duplicates) or skip (leave them "
            "out, listed)"
        },
    )


class KArgsSchema(Schema):
    k = fields.Integer(
        validate=validate.Range(min=1),
        metadata={"description": "How many results (1..the endpoint's max_k; default: its default_k)"},
    )


class SearchArgsSchema(KArgsSchema):
    """k, and an optional filter on the label and metadata fields (service/serving/filters.py)."""

    label = fields.List(
        fields.String(),
        metadata={
            "description": "Only items with this label; repeat for any of several "
            "(`label=shoes&label=boots`)",
            "example": ["shoes"],
        },
    )
    where = fields.String(
        metadata={
            "description": "Only items whose metadata match: a JSON object mapping a field to a value "
            '(equality: `"red"`; 1 equals 1.0, "1" does not), a list (any of them), or '
            '`{"min": .., "max": ..}` (an inclusive numeric range; either bound optional; strings '
            "holding a number count). Every field must match; an item without the field does not. "
            "At most 4096 characters, 50 fields, 100 values per list. A malformed filter is a 422 "
            "naming the problem. Results always satisfy the filter, and number k whenever at least k "
            "items match.",
            "example": '{"colour": ["red", "blue"], "price": {"max": 50}}',
        },
    )


class InferArgsSchema(SearchArgsSchema):
    duplicates = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Mark each result `duplicate` (true when it copies the query: its "
            "duplicate_score at or above the endpoint's [duplicates] threshold)"
        },
    )
    duplicates_only = fields.Boolean(
        load_default=False,
        metadata={
            "description": "Only the results that duplicate the query: is this photo in the catalogue?"
        },
    )


class ImageArgsSchema(Schema):
    version = fields.String(
        metadata={"description": "The version the id belongs to (default: the one served now)"}
    )
    expires = fields.Integer(metadata={"description": "Signed image URLs (QUERY_TOKEN set): expiry time"})
    sig = fields.String(
        validate=validate.Regexp(r"^[0-9a-f]{32}$"),
        metadata={"description": "Signed image URLs: the signature"},
    )


class TrainFormSchema(Schema):
    fine_tune = fields.String(
        load_default="auto",
        validate=validate.OneOf(["auto", "always", "never"]),
        metadata={
            "description": "Train a feature-vector head on the labels: auto (if the labels allow "
            "and it beats the frozen backbone on a hold-out), always, or never"
        },
    )
    file = fields.Raw(
        required=True,
        metadata={
            "type": "string",
            "format": "binary",
            "description": "A zip of images; folders are labels; optional metadata.csv/jsonl",
        },
    )
    on_duplicate = on_duplicate_field()


class TrainAnyFormSchema(TrainFormSchema):
    endpoint = fields.String(required=True, metadata={"description": "The endpoint to train"})


class InferFormSchema(Schema):
    image = fields.List(
        fields.Raw(metadata={"type": "string", "format": "binary"}),
        required=True,
        metadata={"description": "One or more images (repeat the field for a batch)"},
    )


class JobCreatedSchema(Schema):
    job_id = fields.String(required=True)
    status_url = fields.String(required=True)


class SkippedSchema(Schema):
    name = fields.String(required=True)
    reason = fields.String(required=True)


class JobSchema(Schema):
    id = fields.String(required=True)
    endpoint = fields.String(required=True)
    kind = fields.String(
        validate=validate.OneOf(["train", "add", "compact", "duplicates"]),
        metadata={
            "description": "train: replace the catalog (POST /train); add: POST /items; "
            "compact: merge segments (POST /compact, or queued by a change); duplicates: a "
            "duplicate report (POST /duplicates)"
        },
    )
    status = fields.String(
        required=True,
        validate=validate.OneOf(["queued", "running", "succeeded", "failed", "cancelled"]),
    )
    stage = fields.String(
        allow_none=True,
        metadata={
            "description": "ingest, convert, plan, embed, reduce, gather, fine-tune, index, fuse, publish"
        },
    )
    done = fields.Integer(required=True)
    total = fields.Integer(required=True)
    version = fields.String(allow_none=True)
    error = fields.String(allow_none=True)
    skipped = fields.List(fields.Nested(SkippedSchema), required=True)
    counts = fields.Dict(required=True)
    fine_tune = fields.String()
    on_duplicate = fields.String(metadata={"description": "A train's or add's duplicates: allow, flag, skip"})
    options = fields.Dict(metadata={"description": "A duplicate report's threshold"})
    source = fields.String(allow_none=True, metadata={"description": "s3:// URI of the zip, when in S3"})
    attempts = fields.Integer(metadata={"description": "Deliveries by the job queue so far"})
    shards = fields.Dict(
        metadata={
            "description": "A job split over the worker tier: shards total and done, each shard's "
            "images (sizes) and when it was planned (started)"
        }
    )
    rate = fields.Float(
        allow_none=True, metadata={"description": "Images embedded per second, over every worker"}
    )
    evaluation = fields.Dict(
        metadata={
            "description": "Hold-out precision@1, precision@10 and mAP@10 of the frozen backbone and "
            "of the fine-tuned head, and which one was kept"
        }
    )
    runtime = fields.Dict(
        metadata={
            "description": "The runtime that serves the version: litert (the converted encoder, with "
            "the cosines it was checked at) or tensorflow (with the reason it was not converted)"
        }
    )
    created_at = fields.String()
    updated_at = fields.String()


class MatchSchema(Schema):
    id = fields.Integer(
        required=True, metadata={"description": "The item's id: stable across versions while it exists"}
    )
    name = fields.String(
        required=True,
        metadata={"description": "The item's name: its image's path in the zip, or its metadata `item`"},
    )
    photo = fields.String(
        metadata={"description": "Items with several photos: the path of the photo that matched"}
    )
    score = fields.Float(
        required=True, metadata={"description": "Cosine similarity, 1 - d^2/2 of Annoy's angular d"}
    )
    label = fields.String(allow_none=True)
    metadata = fields.Dict(required=True)
    image_url = fields.String(allow_none=True)
    duplicate = fields.Boolean(metadata={"description": "With ?duplicates=true: it copies the query"})
    duplicate_score = fields.Float(metadata={"description": "With ?duplicates=true: the duplicate score"})


class BatchEntrySchema(Schema):
    filename = fields.String(allow_none=True)
    results = fields.List(fields.Nested(MatchSchema), required=True)


class InferResultSchema(Schema):
    endpoint = fields.String(required=True)
    version = fields.String(required=True)
    results = fields.List(
        fields.Nested(MatchSchema), metadata={"description": "For a single image, best first"}
    )
    batch = fields.List(
        fields.Nested(BatchEntrySchema), metadata={"description": "For several images, in order"}
    )


class SimilarResultSchema(Schema):
    endpoint = fields.String(required=True)
    version = fields.String(required=True)
    id = fields.Integer(required=True)
    results = fields.List(fields.Nested(MatchSchema), required=True)


class EndpointSchema(Schema):
    name = fields.String(required=True)
    description = fields.String()
    status = fields.String(
        required=True, validate=validate.OneOf(["loading", "untrained", "ready", "failed"])
    )
    version = fields.String(allow_none=True)
    count = fields.Integer(required=True)
    labels = fields.Dict(keys=fields.String(), values=fields.Integer())
    encoder = fields.Dict()
    feature_dim = fields.Integer()
    index = fields.Dict()
    default_k = fields.Integer()
    max_k = fields.Integer()
    duplicate_threshold = fields.Float(metadata={"description": "The endpoint file's [duplicates] threshold"})
    query = fields.Dict(
        metadata={
            "description": "The endpoint file's query treatment: {mirror, expansion, alpha} (docs/API.md)"
        }
    )
    trained_at = fields.String(allow_none=True)
    runtime = fields.Dict(
        metadata={
            "description": "What runs the served version's encoder: litert (its converted model) or "
            "tensorflow, with the reason"
        }
    )
    error = fields.String(allow_none=True, metadata={"description": "Why the last check or load failed"})
    degraded = fields.Boolean(metadata={"description": "True while the store cannot be reached"})
    degraded_since = fields.String(allow_none=True)


class EndpointListSchema(Schema):
    endpoints = fields.List(fields.Nested(EndpointSchema), required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)
    worker = fields.Integer(metadata={"description": "The answering process id"})
    endpoints = fields.Dict(
        keys=fields.String(),
        values=fields.String(allow_none=True),
        metadata={"description": "The version each endpoint serves in this process"},
    )
    problems = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={
            "description": "Why an endpoint's current version is not served here (a file that failed its "
            "check, a full cache, the store out of reach); only endpoints with a problem"
        },
    )

    @post_dump
    def _only_what_is_shown(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # A caller who may not query sees the status alone (no null placeholders).
        return {key: value for key, value in data.items() if value is not None}


class JobOptionsSchema(Schema):
    """A job's form fields besides the zip."""

    fine_tune = fields.String(load_default="auto", validate=validate.OneOf(["auto", "always", "never"]))
    on_duplicate = on_duplicate_field()


class TrainSourceSchema(Schema):
    source = fields.String(
        required=True,
        validate=validate.Regexp(r"^s3://[^/]+/.+", error="Must be an s3://bucket/key URI."),
        metadata={"description": "s3://<the service's bucket>/<key> of a zip uploaded beforehand"},
    )
    fine_tune = fields.String(load_default="auto", validate=validate.OneOf(["auto", "always", "never"]))
    on_duplicate = on_duplicate_field()


class UploadSchema(Schema):
    upload_url = fields.String(required=True, metadata={"description": "PUT the zip here"})
    method = fields.String(required=True, metadata={"example": "PUT"})
    source = fields.String(required=True, metadata={"description": 'Then POST {"source": this} to /train'})
    expires_in = fields.Integer(required=True)


class WorkerMessageSchema(Schema):
    job_id = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{16}$"))
    endpoint = fields.String()
    shard = fields.Integer(
        validate=validate.Range(0, 1_000_000), metadata={"description": "One shard of a sharded job"}
    )


class WorkerResultSchema(Schema):
    job_id = fields.String(required=True)
    status = fields.String(required=True)
    error = fields.String(allow_none=True)


class VersionSchema(Schema):
    version = fields.String(required=True)
    count = fields.Integer(allow_none=True)
    created_at = fields.String(allow_none=True)
    fine_tuned = fields.Boolean()
    current = fields.Boolean(required=True)
    change = fields.String(
        metadata={"description": "What made it: train, add, delete, edit, compact (a compaction), migrate"}
    )
    segments = fields.Integer(metadata={"description": "Segments its catalog is in"})


class VersionListSchema(Schema):
    endpoint = fields.String(required=True)
    current = fields.String(allow_none=True)
    versions = fields.List(fields.Nested(VersionSchema), required=True)


class RollbackSchema(Schema):
    version = fields.String(
        required=True, metadata={"description": "A version listed by GET /<endpoint>/versions"}
    )


class AddItemsFormSchema(Schema):
    file = fields.Raw(
        metadata={
            "type": "string",
            "format": "binary",
            "description": "A zip as for /train (folders = labels, optional metadata file); "
            "an image whose name (path in the zip) exists already replaces that item",
        }
    )
    image = fields.List(
        fields.Raw(metadata={"type": "string", "format": "binary"}),
        metadata={"description": "Or one or more images (repeat the field), with the fields below"},
    )
    name = fields.String(
        metadata={"description": "One image only: the item's name (default: <label>/<file name>)"}
    )
    label = fields.String(metadata={"description": "The images' label"})
    metadata = fields.String(metadata={"description": "A JSON object: the images' metadata fields"})
    fine_tune = fields.String(
        load_default="auto",
        validate=validate.OneOf(["auto", "always", "never"]),
        metadata={
            "description": "always: train the head again on every item's stored vectors; "
            "otherwise the current version's head (if any) embeds the new images"
        },
    )
    on_duplicate = on_duplicate_field()


class DeleteItemsSchema(Schema):
    ids = fields.List(fields.Integer(strict=True), load_default=list, metadata={"description": "Item ids"})
    names = fields.List(fields.String(), load_default=list, metadata={"description": "Item names"})


class EditItemSchema(Schema):
    label = fields.String(
        allow_none=True,
        metadata={"description": "The new label (null: none), by the rule of docs/API.md#labels-and-names"},
    )
    metadata = fields.Dict(
        allow_none=True,
        metadata={"description": "Merged into the item's metadata (JSON merge patch: null removes a field)"},
    )


class ChangeSchema(Schema):
    endpoint = fields.String(required=True)
    version = fields.String(required=True, metadata={"description": "The new version, carrying the change"})
    kind = fields.String(required=True, validate=validate.OneOf(["delete", "edit"]))
    items = fields.List(fields.Integer(), required=True, metadata={"description": "The items changed"})
    count = fields.Integer(required=True, metadata={"description": "Items in the new version"})


class DuplicatesArgsSchema(Schema):
    threshold = fields.Float(
        metadata={
            "description": "Duplicates score at or above this, in (0, 1] (default: the endpoint's "
            "[duplicates] threshold); the score: docs/API.md#duplicates"
        }
    )


class DuplicateItemSchema(Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    label = fields.String(allow_none=True)
    metadata = fields.Dict(required=True)
    photo = fields.Integer(metadata={"description": "Which of the item's photos is the duplicate"})
    score = fields.Float(required=True, metadata={"description": "Its score to the group's first item"})
    image_url = fields.String(allow_none=True, metadata={"description": "Its image, in the report's version"})


class DuplicateGroupSchema(Schema):
    exact = fields.Boolean(required=True, metadata={"description": "Every item's image has the same bytes"})
    items = fields.List(
        fields.Nested(DuplicateItemSchema),
        required=True,
        metadata={"description": "The keeper (the oldest item: the lowest id) first"},
    )


class DuplicateReportSchema(Schema):
    id = fields.String(required=True, metadata={"description": "The report's job"})
    endpoint = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "The job's: queued ... succeeded"})
    stage = fields.String(allow_none=True)
    done = fields.Integer()
    total = fields.Integer()
    error = fields.String(allow_none=True)
    version = fields.String(metadata={"description": "The version the report was computed on"})
    current_version = fields.String(allow_none=True, metadata={"description": "The version served now"})
    stale = fields.Boolean(metadata={"description": "The catalogue changed since the report"})
    threshold = fields.Float(allow_none=True)
    created_at = fields.String()
    counts = fields.Dict(metadata={"description": "items, groups, duplicates (items past each keeper)"})
    groups = fields.List(fields.Nested(DuplicateGroupSchema), required=True)


class DuplicateMarkSchema(Schema):
    ids = fields.List(
        fields.Integer(strict=True),
        required=True,
        metadata={"description": "The items of a group that are not duplicates of each other"},
    )


class DuplicateMarksSchema(Schema):
    endpoint = fields.String(required=True)
    ignored = fields.List(fields.List(fields.Integer()), required=True)
