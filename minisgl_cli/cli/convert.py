"""``minisgl convert``: a GGUF file -> a Hugging Face safetensors directory, or an HF directory -> another dtype."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from minisgl_cli.cli import ui
from minisgl_cli.convert.dtypes import DTYPE_CHOICES


def convert(
    src: Annotated[
        Path | None,
        typer.Argument(
            help="A .gguf file (llama, qwen2, qwen3, qwen3moe; Mixtral as llama), or an HF model directory (config.json + *.safetensors). "
            "Omitted: the embedded default model (SmolLM2-135M-Instruct).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Directory to write the HF model into (omitted: a directory in the model cache, printed).",
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
        bool,
        typer.Option("--force", help="Replace OUTPUT if it exists and is not empty (no -o: convert again)."),
    ] = False,
) -> None:
    """Convert a GGUF file into a Hugging Face safetensors directory, or change an HF directory's dtype.

    OUTPUT gets config.json, generation_config.json, the tokenizer with its chat template, and the weights (dequantized, sharded above 2 GB).

    It is written beside OUTPUT and renamed into place only when complete, so a failed run leaves nothing half-written.

    With no OUTPUT, the model goes into the model cache (~/.cache/minisgl, or $MINISGL_CACHE), once: the
    embedded default as models/smollm2-135m-instruct, a SRC as models/NAME-KEY (KEY: a hash of its path, sizes
    and times; where `-m SRC` looks), a --dtype other than auto added to the name; "NAME: PATH" is printed.

    Example: minisgl convert SmolLM2-135M-Instruct.Q4_1.gguf -o ./smollm2-hf
    """
    # Light imports only until SRC and OUTPUT are checked: torch, gguf and transformers take seconds, and a
    # mistyped path should be refused at once.
    from minisgl_cli.convert.atomic_dir import check_output
    from minisgl_cli.convert.dispatch import source_kind
    from minisgl_cli.model_source import DEFAULT_MODEL, cache_path, convert_into_cache, embedded_gguf

    dtype = dtype.lower()
    if src is not None:
        source_kind(src)
    source = embedded_gguf() if src is None else src
    if output is not None:
        check_output(output, force, source)

    with ui.progress(transient=True) as bar:
        task = bar.add_task(f"convert {source.name}", total=None)

        def report(done: int, total: int, _tensor: str) -> None:
            bar.update(task, completed=done, total=total)

        if output is None:
            out = cache_path(src, dtype)
            convert_into_cache(source, out, dtype, again=force, progress=report)
        else:
            from minisgl_cli.convert import convert as convert_model  # the heavy part: only past the checks

            out = convert_model(source, output, dtype, force, report)
    if output is None:
        name = DEFAULT_MODEL if src is None else src.name
        ui.console.print(f"{name}: {out}", highlight=False, soft_wrap=True)
    else:
        ui.console.print(f"wrote {out}", highlight=False, soft_wrap=True)
