"""Settings: profile defaults, then environment variables, then explicit overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from service.core.config import ROOT, Settings


def test_the_local_profile_is_the_default() -> None:
    settings = Settings.load(environ={})
    assert settings.profile == "local"
    assert settings.storage_uri == f"file://{ROOT / 'data'}"
    assert settings.encoder_mode == "offline"


def test_environment_variables_are_typed() -> None:
    settings = Settings.load(
        environ={
            "STORAGE_URI": "/srv/data",
            "WATCH_INTERVAL_S": "0.5",
            "WARM_ON_START": "false",
            "MAX_IMAGE_MB": "3",
            "CACHE_DIR": "/tmp/c",
        }
    )
    assert settings.storage_uri == "/srv/data"
    assert settings.watch_interval_s == 0.5
    assert settings.warm_on_start is False
    assert settings.max_image_mb == 3
    assert settings.cache_dir == Path("/tmp/c")


def test_explicit_overrides_win_over_the_environment() -> None:
    settings = Settings.load({"max_image_mb": 7}, environ={"MAX_IMAGE_MB": "3"})
    assert settings.max_image_mb == 7


def test_the_aws_profile_needs_a_storage_uri_and_uses_the_encoder_mirror() -> None:
    with pytest.raises(ValueError, match="STORAGE_URI is required"):
        Settings.load(environ={"SERVICE_PROFILE": "aws"})
    settings = Settings.load(
        environ={"SERVICE_PROFILE": "aws", "STORAGE_URI": "/srv", "ADMIN_TOKEN": "t" * 20}
    )
    assert settings.encoder_mode == "mirror"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SERVICE_PROFILE": "cloud"}, "SERVICE_PROFILE must be one of"),
        ({"MAX_IMAGE_MB": "lots"}, "MAX_IMAGE_MB must be an integer"),
        ({"WARM_ON_START": "maybe"}, "WARM_ON_START must be true or false"),
        ({"ENCODER_MODE": "magic"}, "ENCODER_MODE must be one of"),
        ({"SHARD_IMAGES": "0"}, "SHARD_IMAGES must be at least 1"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.load(environ=environ)


def test_unknown_overrides_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown settings"):
        Settings.load({"storage": "x"}, environ={})


def test_every_setting_is_documented() -> None:
    # docs/CONFIGURATION.md's table names each setting by its environment variable.
    documented = (ROOT / "docs" / "CONFIGURATION.md").read_text()
    variables = [
        "SERVICE_PROFILE" if f.name == "profile" else f.name.upper() for f in dataclasses.fields(Settings)
    ]
    missing = [name for name in variables if f"`{name}`" not in documented]
    assert missing == [], f"settings not in docs/CONFIGURATION.md: {missing}"
