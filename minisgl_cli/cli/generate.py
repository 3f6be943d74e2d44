"""``minisgl generate``: offline batch generation, JSONL in, JSONL out.

Everything that can be checked is checked before the first token: the lines (jobs.py), duplicate ids, then each
prompt against the loaded model (tokenizer, vocabulary, context length), so a bad line costs that line only and
--strict can refuse the whole file up front. Output lines are written and flushed as requests finish, so an
interrupted run keeps everything finished and --resume runs only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from minisgl_cli.cli import ui
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import LoadedConfig
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.generation_config import with_model_generation_config
from minisgl_cli.jobs import BadLine, Job, output_record, parse_lines, record_id
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.llm import LLM

STDIO = "-"


@with_config("engine", "sampling")
def generate(
    cfg: LoadedConfig,
    input_file: Annotated[
        str,
        typer.Option(
            "--file", "-f", help="JSONL input, one request per line; - reads stdin.", show_default=False
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", "-o", help="JSONL output file (replaced, unless --resume); - writes stdout."
        ),
    ] = STDIO,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip ids already in the output file and append the rest to it.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse the whole input (exit 2) if any line is malformed.")
    ] = False,
) -> None:
    """Generate completions for every line of a JSONL file, writing one JSON line per request as it finishes.

    A line is {"prompt": "text" or a list of token ids} or {"messages": a list of {"role", "content"}},
    with an optional "id" (default: the line number) and optional sampling fields (max_tokens, temperature,
    top_p, top_k, min_p, seed, stop, ...) over the --temperature/--max-tokens/... defaults (unset ones: the
    model's generation_config.json, unless --generation-config none). OpenAI Batch lines ({"custom_id",
    "method", "url", "body"}) are accepted too and answered in OpenAI's Batch output format.
    Output lines: {"id", "text", "token_ids", "finish_reason", "usage"}, in completion order.

    Example: minisgl generate -f examples/prompts.jsonl -o out.jsonl --temperature 0 --max-tokens 64
    """
    if resume and output == STDIO:
        raise UsageError("--resume appends to an output file: give one with -o FILE")
    # Read first: a missing or empty input is refused before the model is resolved (a first run converts it).
    lines = _read_lines(input_file)
    if not any(line.strip() for line in lines):
        # Most likely the wrong file, or a producer that wrote nothing: exiting 0 would hide it.
        where = "stdin" if input_file == STDIO else input_file
        raise UsageError(f"no requests in {where} (it is empty or has only blank lines)")
    parsed = parse_lines(lines, _defaults(cfg))
    _refuse_or_report(parsed.bad, strict)
    done = _finished_ids(Path(output)) if resume else set()
    jobs = [job for job in parsed.jobs if job.id not in done]
    if done:
        ui.err_console.print(
            f"resume: {plural(len(parsed.jobs) - len(jobs), 'request')} already in {output}",
            highlight=False,
            soft_wrap=True,
        )
    llm: LLM | None = None
    prompts: list[list[int]] = []
    model_bad: list[BadLine] = []
    # Opened (for appending) before the slow model load so an unwritable path fails fast.
    with _open_output(output) as sink:
        if jobs:
            from minisgl_cli.engine.llm import LLM

            # Only now is the model needed (a resume with nothing left, or bad input, never resolves it):
            # its generation_config.json gives the defaults the lines build on, so they are parsed again.
            model_cfg = with_model_generation_config(cfg)
            if model_cfg.config.sampling != cfg.config.sampling:
                jobs = [job for job in parse_lines(lines, _defaults(model_cfg)).jobs if job.id not in done]
            llm = LLM.from_config(cfg.config.engine)
            prompts, jobs, model_bad = _encode(llm, jobs)
            _refuse_or_report(model_bad, strict)
        if not resume and sink is not sys.stdout:
            sink.truncate(0)  # only now: a run refused above leaves an earlier output file as it was
        if llm is not None and jobs:
            with llm:
                _run(llm, prompts, jobs, sink)
    bad = len(parsed.bad) + len(model_bad)
    if bad:
        raise MinisglError(
            f"{plural(bad, 'malformed input line')} skipped (listed above); the other lines were done"
        )


def _defaults(cfg: LoadedConfig) -> SamplingParams:
    return SamplingParams(**dataclasses.asdict(cfg.config.sampling))


def _run(llm: LLM, prompts: list[list[int]], jobs: list[Job], sink: IO[str]) -> None:
    """Generate, writing each record the moment its request finishes; progress and a summary on stderr."""
    prompt_tokens = completion_tokens = 0
    start = time.perf_counter()
    with ui.progress(transient=True) as bar:
        task = bar.add_task("generate", total=len(jobs))
        for out in llm.iter_outputs(prompts, [job.sampling for job in jobs]):
            record = output_record(jobs[out.index], out, llm.model_name)
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()  # a crash later loses nothing finished
            prompt_tokens += out.usage.prompt_tokens
            completion_tokens += out.usage.completion_tokens
            rate = completion_tokens / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, description=f"generate [dim]{rate:,.0f} tok/s[/dim]")
    elapsed = time.perf_counter() - start
    ui.err_console.print(
        f"{plural(len(jobs), 'request')}, {prompt_tokens} prompt + "
        f"{plural(completion_tokens, 'completion token')} "
        f"in {elapsed:.2f} s ({completion_tokens / max(elapsed, 1e-9):,.1f} tok/s)",
        highlight=False,
        soft_wrap=True,
    )


def _encode(llm: LLM, jobs: list[Job]) -> tuple[list[list[int]], list[Job], list[BadLine]]:
    """Each job's prompt ids, or a BadLine for a prompt this model cannot take. The engine refuses a whole call
    for one such prompt, so they are found here first; the ids are then what the engine is given."""
    prompts: list[list[int]] = []
    runnable: list[Job] = []
    bad: list[BadLine] = []
    for job in jobs:
        try:
            llm.check_sampling(job.sampling)
            prompts.append(llm.encode(job.prompt))
        except UsageError as exc:
            bad.append(BadLine(job.line_no, str(exc)))
            continue
        runnable.append(job)
    return prompts, runnable, bad


def _read_lines(spec: str) -> list[bytes]:
    """The input's lines as bytes: each is decoded on its own, so one badly encoded line is one bad line."""
    if spec == STDIO:
        stream = sys.stdin
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode()
    else:
        # Every way the file cannot be read (missing, a directory, no permission) is the user's to fix: exit 2.
        try:
            data = Path(spec).read_bytes()
        except FileNotFoundError:
            raise UsageError(f"input file {spec} does not exist") from None
        except IsADirectoryError:
            raise UsageError(f"input file {spec} is a directory (expected a JSONL file)") from None
        except OSError as exc:
            raise UsageError(f"cannot read input file {spec}: {exc.strerror or exc}") from None
    return [line.removesuffix(b"\r") for line in data.split(b"\n")]


def _finished_ids(path: Path) -> set[str]:
    """Ids already answered in an earlier run's output. An incomplete last line (a write cut short) is cut off,
    so the lines appended next stay whole and that request simply runs again."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
        ui.err_console.print(
            f"resume: dropped an incomplete last line of {path}", style="yellow", highlight=False
        )
    ids: set[str] = set()
    for line in complete.splitlines():
        try:
            found = record_id(json.loads(line))
        except ValueError:  # not JSON: not one of ours, and it answers nothing
            found = None
        if found is not None:
            ids.add(found)
    return ids


@contextmanager
def _open_output(spec: str) -> Iterator[IO[str]]:
    """stdout, or the file opened for appending (the caller empties it once a fresh run is sure to start)."""
    if spec == STDIO:
        yield sys.stdout
        return
    try:
        f = open(spec, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed below
    except OSError as exc:  # no such directory, a directory, no permission: the user's path to fix
        raise UsageError(f"cannot write output file {spec}: {exc.strerror or exc}") from None
    with f:
        yield f


def _refuse_or_report(bad: list[BadLine], strict: bool) -> None:
    """--strict refuses the whole input for its first bad line; otherwise each is listed and skipped."""
    if strict and bad:
        raise UsageError(f"input {bad[0]} (--strict: nothing was run)")
    for line in bad:
        ui.err_console.print(Text(f"skipped input {line}", style="yellow"), soft_wrap=True)
