"""The tokenizer files of a converted GGUF, built by transformers from the GGUF's vocabulary metadata."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from minisgl_cli.convert.gguf_file import GGUFFile
from minisgl_cli.errors import MinisglError


def write_tokenizer(gguf: GGUFFile, out_dir: Path, max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template), chat_template.jinja and
    special_tokens_map.json into `out_dir`."""
    from transformers import AutoTokenizer

    # transformers also reads tokenizer files lying beside the GGUF (a tokenizer.json there gets mixed
    # in), so it is shown the GGUF alone, through a link in an empty directory.
    with tempfile.TemporaryDirectory() as alone:
        (Path(alone) / gguf.path.name).symlink_to(gguf.path.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.path.name)
        except (ValueError, KeyError, OSError) as exc:
            raise MinisglError(f"cannot build a tokenizer from {gguf.path}: {exc}") from exc
    # transformers leaves the GGUF tokenizer unbounded; the model's context is the real limit.
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(out_dir))

    # transformers 5 keeps the template only in chat_template.jinja and bos/eos adding only inside
    # tokenizer.json's post-processor. Older transformers and other engines read both from
    # tokenizer_config.json, so spell them out there too.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = gguf.get("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    config["add_bos_token"] = bool(tokenizer.add_bos_token)
    config["add_eos_token"] = bool(tokenizer.add_eos_token)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    special = {
        name: str(token) for name, token in tokenizer.special_tokens_map.items() if isinstance(token, str)
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
