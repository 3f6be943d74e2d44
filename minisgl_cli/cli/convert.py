"""``minisgl convert``: a GGUF file -> a Hugging Face safetensors directory, or an HF directory -> another dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from minisgl_cli.cli import ui
from minisgl_cli.convert.dtypes import DTYPE_CHOICES
from minisgl_cli.errors import UsageError


def convert(
    src: Annotated[
        Path | None,
        typer.Argument(
            help="A .gguf file (llama, qwen2, qwen3), or an HF model directory (config.json + *.safetensors). "
            "Omitted: the embedded default model (SmolLM2-135M-Instruct).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory to write the HF model into (omitted with no SRC: the model cache).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Literal[DTYPE_CHOICES],
        typer.Option(
            "--dtype",
            help="Weight dtype. auto: float32 for quantized or F32 GGUFs, else the source's own dtype.",
            case_sensitive=False,
        ),
    ] = "auto",
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUTPUT if it exists and is not empty.")
    ] = False,
) -> None:
    """Convert a GGUF file into a Hugging Face safetensors directory, or change an HF directory's dtype.

    OUTPUT gets config.json, generation_config.json, the tokenizer with its chat template, and the weights (dequantized, sharded above 2 GB).

    It is written beside OUTPUT and renamed into place only when complete, so a failed run leaves nothing half-written.

    With no SRC and no OUTPUT, the embedded default model is converted once into the model cache
    (~/.cache/minisgl, or $MINISGL_CACHE) and its path printed.

    Example: minisgl convert SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2-hf
    """
    from minisgl_cli.convert import convert as convert_model  # torch, gguf, transformers: only when run
    from minisgl_cli.model_source import embedded_gguf, resolve_model

    if src is None and output is None:
        source = resolve_model(None)
        ui.console.print(f"{source.name}: {source.path}", highlight=False, soft_wrap=True)
        return
    if output is None:
        raise UsageError("convert needs -o/--output OUT when SRC is given")
    src = embedded_gguf() if src is None else src

    with ui.progress(transient=True) as bar:
        task = bar.add_task(f"convert {src.name}", total=None)

        def report(done: int, total: int, _tensor: str) -> None:
            bar.update(task, completed=done, total=total)

        out = convert_model(src, output, dtype.lower(), force, report)
    ui.console.print(f"wrote {out}", highlight=False, soft_wrap=True)
