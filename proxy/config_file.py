"""Writing a commented config.toml from settings: every setting, its meaning, its value.

The descriptions come from the settings models themselves, so the file `configure`
writes and the repository's `config.toml` can never drift from the code.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, SecretStr

from proxy.settings import Settings, UpstreamSettings

HEADER = """\
# mnemoproxy configuration.
#
# Precedence: built-in defaults < this file < environment variables
# (MNEMOPROXY_<SECTION>__<KEY>, e.g. MNEMOPROXY_SERVER__PORT=9000) < command-line flags.
# Use it with `mnemoproxy start --config config.toml` or MNEMOPROXY_CONFIG=config.toml.
"""

EXAMPLE_BASE_URL = "http://127.0.0.1:11434/v1"  # Ollama; LM Studio :1234, llama.cpp :8080


def render_config(settings: Settings) -> str:
    """The whole file for `settings`, with a comment above every key."""
    parts = [HEADER]
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            parts.append(_section(name, value, field.description or type(value).__doc__))
        elif name == "upstreams":
            parts.append(_upstreams(value, field.description))
        elif isinstance(value, dict):
            parts.append(_table(name, value, field.description))
    return "\n".join(parts)


def _comment(text: str | None) -> list[str]:
    if not text:
        return []
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + len(word) + 1 > 88:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def _section(name: str, model: BaseModel, doc: str | None) -> str:
    lines = [*_comment(doc), f"[{name}]"]
    for key, field in type(model).model_fields.items():
        lines += _comment(field.description)
        lines.append(f"{key} = {toml_value(getattr(model, key))}")
    return "\n".join(lines) + "\n"


def _upstreams(upstreams: dict[str, UpstreamSettings], doc: str | None) -> str:
    lines = _comment(doc)
    if not upstreams:
        # An example to uncomment, listing every setting an upstream has: removing the
        # first "# " of each line leaves the descriptions as comments.
        example = UpstreamSettings(base_url=EXAMPLE_BASE_URL, prefix="local", api_key="")
        block = _upstream_block("local", example)
        commented = [f"#{line}" if line.startswith("#") else f"# {line}" for line in block]
        return "\n".join([*lines, *commented]) + "\n"
    blocks = ["\n".join(lines)] if lines else []
    for name, upstream in upstreams.items():
        blocks.append("\n".join(_upstream_block(name, upstream)) + "\n")
    return "\n".join(blocks)


def _upstream_block(name: str, upstream: UpstreamSettings) -> list[str]:
    block = [f"[upstreams.{toml_key(name)}]"]
    for key, field in UpstreamSettings.model_fields.items():
        value = getattr(upstream, key)
        block += _comment(field.description)
        block.append(f'# {key} = ""' if value is None else f"{key} = {toml_value(value)}")
    return block


def toml_key(key: str) -> str:
    """A TOML key: bare when it can be, quoted otherwise (`lm.studio` -> `"lm.studio"`)."""
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def _table(name: str, table: dict[str, Any], doc: str | None) -> str:
    lines = [*_comment(doc), f"[{name}]"]
    if not table:
        lines.append('# "gpt-4o*" = "openai"')
    for key, value in table.items():
        lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """A TOML literal for a simple settings value."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
