"""Bearer tokens: who may train, upload, roll back and delete, and (optionally) who may query.

- The admin token (ADMIN_TOKEN) may do everything, on every endpoint.
- An endpoint's token (ENDPOINT_TOKENS, a JSON object {"fashion": "..."}) may do everything on
  that endpoint only.
- Queries are open unless QUERY_TOKEN is set; then they need it (or one of the tokens above).

Missing credentials answer 401, wrong ones 403. Tokens are compared in constant time, against
every candidate, and never appear in a message or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field

from service.core.config import parse_token_settings
from service.core.errors import ServiceError


class UnauthorizedError(ServiceError):
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="simsvc"'}


class ForbiddenTokenError(ServiceError):
    status = 403


@dataclass(frozen=True)
class Tokens:
    admin: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    query: str = ""
    image_url_expiry_s: int = 3600

    @classmethod
    def from_settings(
        cls, admin: str, endpoint_tokens: str, query: str, known: list[str], image_url_expiry_s: int = 3600
    ) -> Tokens:
        """Parse and check the token settings (at start-up: a bad value stops the service)."""
        endpoints = parse_token_settings(admin, endpoint_tokens, query, known)
        return cls(admin, endpoints, query, image_url_expiry_s)

    @property
    def writes_open(self) -> bool:
        """No token at all configured: a development setup (the local profile) takes writes."""
        return not self.admin and not self.endpoints

    def require_write(self, authorization: str | None, endpoint: str | None) -> None:
        """Training, uploads, rollbacks, deletes: the admin token or this endpoint's token."""
        if self.writes_open:
            return
        candidates = [self.admin] + ([self.endpoints.get(endpoint, "")] if endpoint else [])
        self._check(authorization, candidates)

    def require_any_write(self, authorization: str | None) -> None:
        """Some write token (admin or any endpoint's), before a body naming the endpoint is read."""
        if not self.writes_open:
            self._check(authorization, [self.admin, *self.endpoints.values()])

    def require_query(self, authorization: str | None, endpoint: str | None) -> None:
        """Queries: open, unless QUERY_TOKEN is set."""
        if not self.query:
            return
        candidates = [self.query, self.admin] + ([self.endpoints.get(endpoint, "")] if endpoint else [])
        self._check(authorization, candidates)

    def allows_query(self, authorization: str | None) -> bool:
        """Whether this header may query every endpoint (no error: for answers that say less)."""
        try:
            self.require_query(authorization, None)
        except ServiceError:
            return False
        return True

    def image_signature(self, endpoint: str, item_id: int, version: str) -> str:
        """Query parameters that let a browser fetch one image without a header ("" when open)."""
        if not self.query:
            return ""
        expires = int(time.time()) + self.image_url_expiry_s
        return f"&expires={expires}&sig={self._sign(endpoint, item_id, version, expires)}"

    def valid_image_signature(
        self, endpoint: str, item_id: int, version: str | None, expires: int | None, sig: str | None
    ) -> bool:
        if not (self.query and version and expires and sig) or expires < time.time():
            return False
        return hmac.compare_digest(sig.encode(), self._sign(endpoint, item_id, version, expires).encode())

    def _sign(self, endpoint: str, item_id: int, version: str, expires: int) -> str:
        message = f"{endpoint}/{item_id}/{version}/{expires}".encode()
        return hmac.new(self.query.encode(), message, hashlib.sha256).hexdigest()[:32]

    @staticmethod
    def _check(authorization: str | None, candidates: list[str]) -> None:
        if not authorization:
            raise UnauthorizedError("this needs a bearer token: send 'Authorization: Bearer <token>'")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise UnauthorizedError("the Authorization header must be 'Bearer <token>'")
        given = presented.strip().encode()
        # Compare with every candidate, always: the time taken says nothing about which matched.
        matched = False
        for candidate in candidates:
            if candidate:
                matched |= hmac.compare_digest(given, candidate.encode())
        if not matched:
            raise ForbiddenTokenError("this token may not do that")
