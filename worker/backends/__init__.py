"""Model backends, chosen by the MODEL_BACKEND setting."""

from __future__ import annotations

from core.config import Settings
from worker.backends.base import ModelBackend, ModelError, ModelFailure, ModelUnavailable

__all__ = ["ModelBackend", "ModelError", "ModelFailure", "ModelUnavailable", "create_backend"]


def create_backend(settings: Settings) -> ModelBackend:
    if settings.model_backend == "local":
        from worker.backends.local import LocalBackend

        return LocalBackend(settings)
    if settings.model_backend == "openai":
        from worker.backends.openai_compat import ChatCompletionsBackend

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return ChatCompletionsBackend(
            settings, base_url=settings.openai_base_url, api_key=key, model=settings.openai_model
        )
    from worker.backends.huggingface import create_huggingface_backend

    return create_huggingface_backend(settings)
