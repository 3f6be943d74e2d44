"""Which tool-call and reasoning parsers a served model gets: `--tool-call-parser` / `--reasoning-parser`, or
with "auto" what the model's chat template and type imply (read from its files, without loading the tokenizer,
so the API process stays light)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minisgl_cli.config import ServerConfig
from minisgl_cli.model_source import ModelSource
from minisgl_cli.server import reasoning, tool_parsers


def chat_template(path: Path | None) -> str | None:
    """The chat template in a model directory (tokenizer_config.json's, or chat_template.jinja), if any."""
    if path is None:
        return None
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8", errors="replace")
    config = path / "tokenizer_config.json"
    try:
        template: Any = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else None


def pick_parsers(server: ServerConfig, source: ModelSource) -> tuple[str | None, str | None]:
    """(tool-call parser, reasoning parser) names for this model; None: none."""
    template = chat_template(source.path)
    tool = server.tool_call_parser
    tool_parser = tool_parsers.detect_parser(template) if tool == "auto" else None if tool == "none" else tool
    thinking = server.reasoning_parser
    model_type = source.hf_config.get("model_type")
    if thinking == "auto":
        reasoning_parser = reasoning.default_parser(model_type, template)
    else:
        reasoning_parser = None if thinking == "none" else thinking
    return tool_parser, reasoning_parser
