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


# --- The tutorial's settings ---------------------------------------------------------------------


def from_env(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_USER", "REDIS_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


def test_redis_parts_build_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(
        monkeypatch,
        REDIS_HOST="redis-123.cloud.example",
        REDIS_PORT="16379",
        REDIS_USER="default",
        REDIS_PASSWORD="p@ss/word:1",
    )
    assert settings.redis_url == "redis://default:p%40ss%2Fword%3A1@redis-123.cloud.example:16379/0"
    assert "redis_url" in settings.model_fields_set  # so `make run` starts no Redis of its own


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({"REDIS_HOST": "db"}, "redis://db:6379/0"),
        ({"REDIS_PORT": "6380"}, "redis://127.0.0.1:6380/0"),
        ({"REDIS_HOST": "db", "REDIS_PASSWORD": "pw"}, "redis://:pw@db:6379/0"),
        ({"REDIS_HOST": "::1", "REDIS_PORT": "7000"}, "redis://[::1]:7000/0"),
    ],
)
def test_redis_parts_have_defaults(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str
) -> None:
    assert from_env(monkeypatch, **env).redis_url == url


def test_redis_url_wins_over_the_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher passes its embedded Redis's URL (with the generated password) to the server
    and workers as REDIS_URL: a REDIS_PASSWORD left in the environment must not replace it."""
    embedded = "redis://:generated-secret@127.0.0.1:6379/0"
    settings = from_env(monkeypatch, REDIS_URL=embedded, REDIS_HOST="db", REDIS_PASSWORD="other")
    assert settings.redis_url == embedded


def test_without_any_part_the_default_stays_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = from_env(monkeypatch)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert "redis_url" not in settings.model_fields_set  # `make run` starts its own Redis


def test_an_empty_redis_url_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert from_env(monkeypatch, REDIS_URL="").redis_url == "redis://127.0.0.1:6379/0"
    assert from_env(monkeypatch, REDIS_URL="", REDIS_HOST="db").redis_url == "redis://db:6379/0"


def test_a_password_without_a_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="REDIS_PASSWORD is set without REDIS_HOST"):
        from_env(monkeypatch, REDIS_PASSWORD="pw")


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        ("localhost:6379", "redis://localhost:6379"),
        ("10.0.0.5:6380", "redis://10.0.0.5:6380"),
        ("rediss://u:p@h:1/0", "rediss://u:p@h:1/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
    ],
)
def test_a_redis_url_without_a_scheme_is_redis(
    monkeypatch: pytest.MonkeyPatch, raw: str, url: str
) -> None:
    assert from_env(monkeypatch, REDIS_URL=raw).redis_url == url


def test_a_redis_url_with_another_scheme_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="use redis://, rediss://"):
        from_env(monkeypatch, REDIS_URL="http://localhost:6379")


def test_the_tutorials_token_spelling_is_hf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUGGINFACE_INFERENCE_TOKEN", "hf_tutorial")
    settings = Settings(_env_file=None)
    assert settings.hf_token is not None
    assert settings.hf_token.get_secret_value() == "hf_tutorial"


TUTORIAL_MODEL_URL = "https://api-inference.huggingface.co/models/microsoft/DialoGPT-medium"


def test_a_tutorial_model_url_means_text_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_API", raising=False)
    settings = Settings(_env_file=None, model_backend="huggingface", model_url=TUTORIAL_MODEL_URL)
    assert settings.hf_form == "text-generation"
    assert settings.hf_endpoint == TUTORIAL_MODEL_URL


@pytest.mark.parametrize(
    "url",
    [
        "https://router.huggingface.co/v1",
        "https://x.endpoints.huggingface.cloud",
        "https://router.huggingface.co/hf-inference/models/org/name/v1",
    ],
)
def test_other_model_urls_keep_the_chat_form(url: str) -> None:
    assert Settings(_env_file=None, model_url=url).hf_form == "chat"


def test_chat_set_on_purpose_with_a_model_address_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"HF_API=chat with MODEL_URL=.*text-generation"):
        Settings(_env_file=None, hf_api="chat", model_url=TUTORIAL_MODEL_URL)
    settings = Settings(_env_file=None, hf_api="text-generation", model_url=TUTORIAL_MODEL_URL)
    assert settings.hf_form == "text-generation"
