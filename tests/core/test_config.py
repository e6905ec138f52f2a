"""Settings: the defaults of the limits, and what production refuses."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from core.config import Settings


def test_limit_defaults_are_on_and_sane() -> None:
    settings = Settings(_env_file=None)
    assert settings.app_env == "development"
    assert settings.rate_limit_session_messages == 30
    assert settings.rate_limit_window_seconds == 10
    assert settings.rate_limit_address_messages == 120
    assert settings.rate_limit_token_requests == 20
    assert settings.rate_limit_http_window_seconds == 60
    assert settings.max_sockets_per_session == 5
    assert settings.max_history_messages == 1000
    assert settings.forwarded_allow_ips == []
    assert "*" not in settings.allowed_origins
    assert "http://localhost:5173" in settings.allowed_origins


@pytest.mark.parametrize("field", ["cors_origins", "allowed_origins"])
def test_production_refuses_wildcard_origins(field: str) -> None:
    wildcard: dict[str, Any] = {field: ["https://a.example", "*"]}
    with pytest.raises(ValidationError, match=f"does not allow '\\*' in {field.upper()}"):
        Settings(_env_file=None, app_env="production", **wildcard)
    # Development allows it (a local experiment), and production allows listed origins.
    assert Settings(_env_file=None, **wildcard)
    listed: dict[str, Any] = {field: ["https://a.example"]}
    assert Settings(_env_file=None, app_env="production", **listed)


def test_production_wildcard_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("CORS_ORIGINS", '["*"]')
    with pytest.raises(ValidationError, match="CORS_ORIGINS"):
        Settings(_env_file=None)


def test_unknown_environment_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, app_env="staging")


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ('["127.0.0.1", "10.0.0.0/8"]', ["127.0.0.1", "10.0.0.0/8"]),
        ("127.0.0.1, 10.0.0.0/8", ["127.0.0.1", "10.0.0.0/8"]),  # uvicorn's own form
        ("", []),
    ],
)
def test_forwarded_allow_ips_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, parsed: list[str]
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", raw)
    assert Settings(_env_file=None).forwarded_allow_ips == parsed


def test_dev_origins_are_allowed_in_development_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "http://localhost:5173" in Settings(_env_file=None).socket_origins
    assert Settings(_env_file=None, app_env="production").socket_origins == []
    monkeypatch.setenv("ALLOWED_ORIGINS", '["https://chat.example"]')
    production = Settings(_env_file=None, app_env="production")
    assert production.socket_origins == ["https://chat.example"]


@pytest.mark.parametrize("variable", ["PROMPT_HISTORY_MESSAGES", "HISTORY_MESSAGES"])
def test_the_prompt_window_takes_its_new_and_its_old_name(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HISTORY_MESSAGES was renamed (it sat next to MAX_HISTORY_MESSAGES, which means messages
    kept, not messages in the prompt); an existing .env with the old name keeps working."""
    monkeypatch.setenv(variable, "7")
    assert Settings(_env_file=None).prompt_history_messages == 7
