"""The request's view of the app: the `Service` every view calls, and the token rules."""

from __future__ import annotations

from flask import current_app

from service.api.auth import Tokens
from service.application.service import Service


def svc() -> Service:
    return current_app.extensions["simsvc"]


def tokens() -> Tokens:
    return current_app.extensions["simsvc.tokens"]
