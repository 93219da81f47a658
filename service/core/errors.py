"""Domain errors: each carries the HTTP status it maps to and a message safe to show clients."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a client; `status` is the HTTP status."""

    status: int = 500
    retry_after_s: int | None = None  # sent as Retry-After when set

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors

    def headers(self) -> dict[str, str]:
        """Extra response headers for this error."""
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Intact across processes (a training job's child), whatever a subclass's __init__ takes.
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[ServiceError], args: tuple[Any, ...], state: dict[str, Any]) -> ServiceError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class ForbiddenError(ServiceError):
    """Understood, but not allowed (e.g. a training source outside the service's bucket)."""

    status = 403


class ConflictError(ServiceError):
    """Not possible in the service's current configuration or state."""

    status = 409


def shorten(text: str, limit: int = 60) -> str:
    """`text` for a message: cut after `limit` characters (a client's input is never echoed whole)."""
    return text if len(text) <= limit else text[:limit] + "..."


class NotFoundError(ServiceError):
    status = 404


class EndpointNotFoundError(NotFoundError):
    def __init__(self, name: str, known: list[str]) -> None:
        # Not listing the known names: with QUERY_TOKEN set, GET /endpoints needs a token. A name
        # is at most 64 characters: one longer is cut, not echoed whole.
        super().__init__(f"No endpoint named {shorten(name, 64)!r} (GET /endpoints lists them).")


class JobNotFoundError(NotFoundError):
    def __init__(self, endpoint: str, job_id: str) -> None:
        super().__init__(f"No training job {job_id!r} for endpoint {endpoint!r}.")


class ItemNotFoundError(NotFoundError):
    pass


class ReportNotFoundError(NotFoundError):
    def __init__(self, endpoint: str, job_id: str) -> None:
        super().__init__(f"No duplicate report {shorten(job_id, 64)!r} for endpoint {endpoint!r}.")


class BadImageError(ServiceError):
    """An uploaded image that cannot be decoded."""

    status = 400


class PayloadTooLargeError(ServiceError):
    status = 413


class InvalidHostError(ServiceError):
    """A Host header outside TRUSTED_HOSTS: it would build the URLs of the answer."""

    status = 400


class InsufficientStorageError(ServiceError):
    """This instance's disk is full: the request may succeed later or on another instance."""

    status = 507


class UnsupportedMediaTypeError(ServiceError):
    status = 415


class InvalidParameterError(ServiceError):
    """A parameter outside its allowed range (e.g. `k`), or a body that is not what the route takes."""

    status = 422


class NotAZipError(InvalidParameterError):
    pass


class NotTrainedError(ServiceError):
    """The endpoint has no published version yet (or it is still loading)."""

    status = 503


class EndpointLoadingError(ServiceError):
    """The endpoint's version is being loaded (a worker starting, a first request)."""

    status = 503
    retry_after_s = 2


class EndpointUnavailableError(ServiceError):
    """The endpoint has a version but cannot serve it (its store or encoder failed)."""

    status = 503


class EncoderUnavailableError(ServiceError):
    """An encoder that cannot be loaded: a TF-Hub handle that cannot be fetched, a missing folder."""

    status = 503


class StorageError(ServiceError):
    """The store (local folder or S3) failed or holds something inconsistent."""

    status = 503


class IntegrityError(StorageError):
    """A published file does not match the sha256 its manifest records."""


class TrainingError(ServiceError):
    """A training job that cannot go on; its message goes into the job's status."""

    status = 422

    def __init__(self, message: str, skipped: list[Any] | None = None) -> None:
        super().__init__(message)
        self.skipped = skipped or []  # files left out before the job gave up


class JobCancelledError(ServiceError):
    """A job stopped because it was cancelled (DELETE /<endpoint>/jobs/<id>); nothing was published."""

    status = 409

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled; nothing was published")


class JobRetryError(ServiceError):
    """A delivered job failed in a way worth another attempt (the queue will redeliver it)."""

    status = 503


class EndpointConfigError(Exception):
    """A bad endpoint file: raised at start-up, naming the file and the field."""
