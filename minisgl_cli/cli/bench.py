"""``minisgl bench``: offline throughput and batch latency, optionally against transformers (``--baseline hf``),
the shared-prefix cache benchmark, ``bench serve``, the online benchmark of any OpenAI-compatible server, and
``bench compare``, two ``--json`` reports side by side. ``--plot FILE`` draws a run's figure (bench/plot.py).

Each system runs on its own: the engine first, then (with a baseline) it is released before transformers
loads the model, so the two never share the device's memory. Both use the same dtype and device, resolved
once here the way the engine resolves them.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.text import Text

from minisgl_cli.cli import ui
from minisgl_cli.cli.options import with_config
from minisgl_cli.config import SETTINGS, EngineConfig, LoadedConfig
from minisgl_cli.errors import MinisglError, UsageError

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel

    from minisgl_cli.bench.progress import Progress
    from minisgl_cli.bench.report import Comparison, TableData
    from minisgl_cli.bench.workload import Workload
    from minisgl_cli.engine.models.config import ModelConfig
    from minisgl_cli.model_source import ModelSource

DEFAULT_HF_BATCH_SIZE = 64
DEFAULT_NOISE_PERCENT = 4.0  # bench compare --noise: bench/compare.py's DEFAULT_NOISE, which says why
# bench serve's random token ids lie in [V // 10, V): below every real model's vocabulary, above the special
# and byte tokens that tokenizers keep at the lowest ids.
DEFAULT_VOCAB_SIZE = 10_000
# [bench] settings of the online serving benchmark: meaningless when every request is sent at once.
_ONLINE_ONLY = ("request_rate", "max_concurrency")

app = typer.Typer(
    help="Benchmark the engine: offline throughput and batch latency, optionally against transformers; "
    "or any OpenAI-compatible server online (bench serve); compare two --json reports (bench compare).\n\n"
    "Example: minisgl bench offline --num-prompts 64 --input-len 128 --output-len 128 --baseline hf",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

BaselineOption = Annotated[
    Literal["hf"] | None,
    typer.Option(
        "--baseline", help="Also run transformers on the same requests and print minisgl / hf ratios."
    ),
]
JsonOption = Annotated[
    Path | None,
    typer.Option(
        "--json",
        help="Also write the results as JSON (schema in minisgl_cli/bench/report.py).",
        show_default=False,
    ),
]
PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help='Also draw the results into FILE.png (needs matplotlib: pip install "minisgl\\[plot]").',
        show_default=False,
    ),
]


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What both systems share: the model, and the device and dtype they run on."""

    source: ModelSource
    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype


@app.command()
@with_config("engine", "bench")
def offline(
    cfg: LoadedConfig,
    baseline: BaselineOption = None,
    hf_batch_size: Annotated[
        int | None,
        typer.Option(
            "--hf-batch-size",
            help=f"Static batch size of the transformers baseline \\[default: {DEFAULT_HF_BATCH_SIZE}].",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            help="Sampling temperature of every request (0: greedy); 0.6 is the common offline workload's.",
            min=0.0,
            max=100.0,
        ),
    ] = 0.6,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            help="Constrain every request's output to the JSON schema in this file (structured outputs); a "
            "request then ends when its JSON is complete.",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOption = None,
    plot_path: PlotOption = None,
) -> None:
    """Throughput: every prompt at once, each generating exactly its output length (eos ignored), sampled at
    --temperature.

    --dataset random (the default): prompts of random token ids, --num-prompts of them, lengths uniform in
    --input-len and --output-len (N or MIN,MAX), drawn from --dataset-seed.

    --dataset FILE: a JSONL file, one {"prompt": text or token ids, "output_len": N} per line, or a ShareGPT
    JSON file (each conversation's first human turn). Output lengths missing from the file are drawn from
    --output-len; text is encoded by the model's tokenizer. The whole file runs unless --num-prompts is
    given (JSONL: its first N lines; ShareGPT: N conversations picked from --dataset-seed).

    Prints requests/s and input, output and total tokens/s. --plot draws tokens/s and requests completed
    over time.

    --baseline hf runs transformers on the same requests as vLLM's HF backend does: static batches of
    --hf-batch-size, left-padded, sampled at the same temperature (no top-k or top-p), every row generating
    the batch's longest output; only each request's own output tokens are counted.

    Example: minisgl bench offline --dummy-weights -m qwen3-0.6b --num-prompts 32 --input-len 256 --output-len 128
    """
    for name in _ONLINE_ONLY:
        if cfg.sources[name].startswith("flag"):
            raise UsageError(
                f"{SETTINGS[name].flag} is for online serving benchmarks; bench offline sends every request at once"
            )
    if json_schema is not None and baseline is not None:
        raise UsageError("--json-schema constrains minisgl only: the transformers baseline cannot run it")
    from minisgl_cli.engine.structured import StructuredOutput, read_json_schema

    structured = (
        None
        if json_schema is None
        else StructuredOutput.json_schema(
            read_json_schema(json_schema, "--json-schema"), param="--json-schema"
        )
    )
    if hf_batch_size is not None and baseline is None:
        raise UsageError("--hf-batch-size sets the transformers baseline's batch size: add --baseline hf")
    hf_batch_size = DEFAULT_HF_BATCH_SIZE if hf_batch_size is None else hf_batch_size
    if hf_batch_size < 1:
        raise UsageError(f"--hf-batch-size {hf_batch_size}: expected a positive integer")
    from minisgl_cli.bench.workload import RANDOM

    bench = cfg.config.bench
    from_file = bench.dataset != RANDOM
    if from_file and cfg.sources["input_len"].startswith("flag"):
        raise UsageError(
            "--input-len is for the random dataset: a dataset file's prompts keep their own length"
        )
    _check_outputs(json_path, plot_path)

    from minisgl_cli.bench.offline import run_offline
    from minisgl_cli.bench.report import build_report, offline_comparisons, offline_table
    from minisgl_cli.engine.llm import LLM

    engine = cfg.config.engine
    setup = _setup(engine)
    workload = _offline_workload(cfg, setup)
    # The bars count output tokens: one of requests would not move (bench/progress.py).
    tokens = workload.output_tokens
    with LLM.from_config(engine) as llm, _progress("minisgl", tokens, "tok") as advance:
        results = [run_offline(llm, workload, advance, temperature=temperature, structured=structured)]
    del llm  # its weights and KV pool go before the baseline loads
    if baseline == "hf":
        from minisgl_cli.bench.hf_baseline import run_hf_offline

        model = _load_hf(engine, setup)
        with _progress("transformers", tokens, "tok") as advance:
            results.append(run_hf_offline(model, workload, hf_batch_size, advance, temperature=temperature))

    comparisons = offline_comparisons(results)
    title = f"bench offline: {setup.source.name}"
    _print(title, offline_table(results), comparisons)
    if json_path is not None:
        workload_config = {
            "dataset": bench.dataset,
            "num_prompts": len(workload.requests),
            "input_len": None if from_file else bench.input_len,
            "output_len": bench.output_len,
            "dataset_seed": bench.dataset_seed,
            "hf_batch_size": hf_batch_size if baseline else None,
            "temperature": temperature,
            "json_schema": None if json_schema is None else str(json_schema),
        }
        config = _report_config(engine, setup, baseline, workload_config)
        _write(json_path, build_report("offline", config, results, comparisons))
    if plot_path is not None:
        from minisgl_cli.bench.plot import offline_figure

        _save_plot(plot_path, offline_figure(title, results))


@app.command()
@with_config("engine")
def latency(
    cfg: LoadedConfig,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Batch sizes to measure, comma-separated.")
    ] = "1,8,32",
    input_len: Annotated[
        int, typer.Option("--input-len", help="Prompt length in tokens (one number).")
    ] = 128,
    output_len: Annotated[
        int, typer.Option("--output-len", help="Tokens generated per request (one number, >= 2).")
    ] = 256,
    baseline: BaselineOption = None,
    json_path: JsonOption = None,
    plot_path: PlotOption = None,
) -> None:
    """Latency per batch size: the prefill of B prompts, then the time per decode step and decode tokens/s.

    Runs through the engine's scheduler (its real step), greedy, eos ignored; prompts are random token ids
    drawn from --random-seed. Here --input-len and --output-len are single numbers, not the ranges (or the
    config file's values) that bench offline takes. --plot draws decode ms/step and prefill ms against the
    batch size.

    Example: minisgl bench latency --dummy-weights -m llama-3.2-1b --batch-sizes 1,16 --input-len 512 --output-len 64
    """
    from minisgl_cli.bench.latency import check_lengths, parse_batch_sizes

    sizes = parse_batch_sizes(batch_sizes)
    check_lengths(input_len, output_len)
    _check_outputs(json_path, plot_path)

    from minisgl_cli.bench.latency import DecodeTraffic, run_latency, streaming_bandwidth, with_roofline
    from minisgl_cli.bench.report import build_report, latency_comparisons, latency_table
    from minisgl_cli.engine.llm import LLM

    engine = cfg.config.engine
    setup = _setup(engine)
    seed = engine.random_seed
    steps = len(sizes) * output_len  # each batch size: its prefill, then output_len - 1 decode steps
    with LLM.from_config(engine) as llm, _progress("minisgl", steps, "step") as advance:
        results = run_latency(llm, sizes, input_len, output_len, seed, advance)
    del llm  # its weights and KV pool go before the baseline loads
    if baseline == "hf":
        from minisgl_cli.bench.hf_baseline import run_hf_latency

        model = _load_hf(engine, setup)
        with _progress("transformers", steps, "step") as advance:
            results += run_hf_latency(model, sizes, input_len, output_len, seed, advance)
    # The roofline share, on GPUs: the bytes a decode step must read over the bandwidth measured now (on
    # one GPU; with --tp N, N GPUs read their shares at once).
    bandwidth = streaming_bandwidth(setup.device)
    if bandwidth is not None:
        bandwidth *= engine.tp
        traffic = DecodeTraffic.of_model(setup.model_config, setup.dtype)
        results = [with_roofline(r, traffic, bandwidth) for r in results]

    comparisons = latency_comparisons(results)
    title = f"bench latency: {setup.source.name}"
    _print(title, latency_table(results), comparisons)
    if bandwidth is not None:
        weights = f"weights ({traffic.weight_bytes / 1e9:.2f} GB)"
        if traffic.num_experts:
            weights = (
                f"weights ({traffic.weight_bytes / 1e9:.2f} GB besides the experts, plus "
                f"{traffic.expert_bytes / 1e9:.3f} GB for each of the experts a layer's tokens pick: "
                f"{traffic.experts_read(1):.0f} of {traffic.num_experts} at batch 1)"
            )
        ui.console.print(
            f"roofline: {weights} and K/V read once per decode step at "
            f"{bandwidth / 1e12:.2f} TB/s, the bf16 GEMV streaming rate measured in this run"
            + (f" on one GPU, times {engine.tp} (--tp)" if engine.tp > 1 else ""),
            highlight=False,
        )
    if json_path is not None:
        own = {"batch_sizes": sizes, "input_len": input_len, "output_len": output_len, "seed": seed,
               "bandwidth_bytes_per_s": bandwidth}  # fmt: skip
        _write(
            json_path,
            build_report("latency", _report_config(engine, setup, baseline, own), results, comparisons),
        )
    if plot_path is not None:
        from minisgl_cli.bench.plot import latency_figure

        _save_plot(plot_path, latency_figure(title, results))


@app.command()
@with_config("engine")
def prefix(
    cfg: LoadedConfig,
    num_prompts: Annotated[
        int, typer.Option("--num-prompts", help="Requests sharing the prefix.", min=1)
    ] = 64,
    prefix_len: Annotated[
        int, typer.Option("--prefix-len", help="Tokens of the shared prefix.", min=1)
    ] = 1000,
    question_len: Annotated[
        int, typer.Option("--question-len", help="Tokens each request adds after the prefix.", min=1)
    ] = 50,
    output_len: Annotated[
        int, typer.Option("--output-len", help="Tokens each request generates.", min=1)
    ] = 64,
    dataset_seed: Annotated[
        int, typer.Option("--dataset-seed", help="Seed of the random token ids.", min=0)
    ] = 0,
    json_path: JsonOption = None,
    plot_path: PlotOption = None,
) -> None:
    """Prefix caching: the same shared-prefix workload with --cache-type radix, then naive, in one run.

    Every request is one shared --prefix-len prefix (a system prompt) plus --question-len tokens of its own
    and generates exactly --output-len tokens (greedy, eos ignored). Prints the prompt tokens the model
    computed (the shared part ideally once), the tokens served from the cache, and throughput for each;
    --plot draws both as bars.

    Example: minisgl bench prefix --num-prompts 64 --prefix-len 1000 --question-len 50 --output-len 64
    """
    if cfg.sources["cache_type"] != "default":
        raise UsageError("bench prefix runs both --cache-type radix and naive itself: drop --cache-type")
    _check_outputs(json_path, plot_path)

    from minisgl_cli.bench.prefix import comparisons, record, run_prefix, table
    from minisgl_cli.bench.report import machine_info
    from minisgl_cli.bench.workload import shared_prefix_workload
    from minisgl_cli.engine.llm import LLM

    engine = cfg.config.engine
    setup = _setup(engine)
    workload = shared_prefix_workload(
        num_prompts, prefix_len, question_len, output_len, setup.model_config.vocab_size, dataset_seed
    )
    results = []
    for cache_type in ("radix", "naive"):
        llm = LLM.from_config(dataclasses.replace(engine, cache_type=cache_type))
        with llm, _progress(cache_type, workload.output_tokens, "tok") as advance:
            results.append(run_prefix(llm, cache_type, workload, advance))
        del llm  # one engine's KV pool at a time
        gc.collect()
    columns, rows = table(results)
    title = f"bench prefix: {setup.source.name}"
    ui.print_table(title, columns, rows)
    ratios = comparisons(*results)
    ui.console.print(
        f"radix / naive: total tok/s = {ratios[0]['ratio']:.2f}x, prompt tokens computed = {ratios[1]['ratio']:.3f}x",
        highlight=False,
        soft_wrap=True,
    )
    if json_path is not None:
        bench = {
            "num_prompts": num_prompts,
            "prefix_len": prefix_len,
            "question_len": question_len,
            "output_len": output_len,
            "dataset_seed": dataset_seed,
        }
        config = {
            "model": setup.source.name,
            "device": str(setup.device),
            "dtype": str(setup.dtype).removeprefix("torch."),
            "engine": dataclasses.asdict(engine),
            "bench": bench,
        }
        report = {
            "schema_version": 1,
            "command": "prefix",
            "machine": machine_info(),
            "config": config,
            "results": [record(r) for r in results],
            "comparisons": ratios,
        }
        _write(json_path, report)
    if plot_path is not None:
        from minisgl_cli.bench.plot import prefix_figure

        _save_plot(plot_path, prefix_figure(title, results))


@app.command()
@with_config("bench")
def serve(
    cfg: LoadedConfig,
    url: Annotated[
        str,
        typer.Option(
            "--url", help="The OpenAI-compatible server, e.g. http://127.0.0.1:1919 (a trailing /v1 is fine)."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Model name sent in each request (default: the first id of GET /v1/models).",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Sent as 'Authorization: Bearer KEY'.", show_default=False)
    ] = None,
    dataset_path: Annotated[
        Path | None,
        typer.Option(
            "--dataset-path", help="The ShareGPT JSON file of --dataset sharegpt.", show_default=False
        ),
    ] = None,
    vocab_size: Annotated[
        int,
        typer.Option(
            "--vocab-size",
            help="random dataset: token ids are drawn from [V // 10, V); keep V below the model's vocabulary.",
            min=2,
        ),
    ] = DEFAULT_VOCAB_SIZE,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Sampling temperature of every request.", min=0.0)
    ] = 0.0,
    slo: Annotated[
        str | None,
        typer.Option(
            "--slo",
            help="Bounds in ms for goodput, e.g. ttft=200,tpot=50 (keys ttft, tpot, e2e).",
            show_default=False,
        ),
    ] = None,
    json_path: JsonOption = None,
    plot_path: PlotOption = None,
) -> None:
    """Online serving: stream completions from any OpenAI-compatible server and time every token.

    The random dataset sends prompts of random token ids (lengths uniform in --input-len) to /v1/completions;
    --dataset sharegpt sends each conversation's first human turn from --dataset-path to
    /v1/chat/completions. Every request asks for its --output-len tokens with ignore_eos. Requests go all at
    once, or as Poisson arrivals at --request-rate per second; --max-concurrency caps those in flight.

    Prints request and token throughput and TTFT, inter-token latency (ITL), time per output token (TPOT)
    and end-to-end latency (mean, median, p90, p99), failures, and with --slo the goodput: requests per
    second that met every bound. --plot draws the CDFs of TTFT, ITL and E2E and output tokens/s over time.

    Example: minisgl bench serve --url http://127.0.0.1:1919 --num-prompts 200 --request-rate 8 --slo ttft=500
    """
    from minisgl_cli.bench.report import build_report, serving_notes, serving_tables
    from minisgl_cli.bench.serving import Target, arrival_offsets, parse_slo, run_serving, summarize
    from minisgl_cli.bench.workload import load_serve_workload
    from minisgl_cli.openai_http import list_models, normalize_url

    # httpx logs every request at INFO: one line per request over the progress bar. Kept for --log-level debug.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    bench = cfg.config.bench
    sharegpt = bench.dataset == "sharegpt"
    if sharegpt and cfg.sources["input_len"].startswith("flag"):
        raise UsageError("--input-len is for the random dataset: sharegpt prompts keep their own length")
    bounds = parse_slo(slo) if slo is not None else None
    base_url = normalize_url(url)
    _check_outputs(json_path, plot_path)
    requests = load_serve_workload(bench, dataset_path, vocab_size)
    offsets = arrival_offsets(len(requests), bench.request_rate, bench.dataset_seed)

    served = list_models(base_url, api_key)
    if model is None:
        if not served:
            raise MinisglError(f"{base_url}/v1/models lists no model: pass --model")
        model = served[0]
    target = Target(base_url, model, api_key, temperature)
    with _progress("requests", len(requests)) as advance:
        records, elapsed_s = run_serving(target, requests, offsets, bench.max_concurrency, advance)
    result = summarize(records, elapsed_s, bounds)

    throughput, latencies = serving_tables(result)
    title = f"bench serve: {model} at {base_url}"
    # A line of its own: as a table title it would wrap to the narrow table's width.
    ui.console.print(Text(title), soft_wrap=True)
    ui.print_table(None, throughput.columns, throughput.rows)
    ui.print_table(None, latencies.columns, latencies.rows)
    for note in serving_notes(result):
        ui.console.print(Text(note, style="yellow"), soft_wrap=True)
    if json_path is not None:
        config = {
            "model": model,
            "url": base_url,
            "bench": {
                "dataset": bench.dataset,
                "dataset_path": str(dataset_path) if dataset_path is not None else None,
                "num_prompts": bench.num_prompts,
                "input_len": None if sharegpt else bench.input_len,
                "output_len": bench.output_len,
                "dataset_seed": bench.dataset_seed,
                "vocab_size": None if sharegpt else vocab_size,
                "request_rate": bench.request_rate,
                "max_concurrency": bench.max_concurrency,
                "temperature": temperature,
                "slo": None if bounds is None else dataclasses.asdict(bounds),
            },
        }
        _write(json_path, build_report("serve", config, [result], []))
    if plot_path is not None:
        from minisgl_cli.bench.plot import serving_figure

        _save_plot(plot_path, serving_figure(title, records, elapsed_s))


@app.command()
def compare(
    a: Annotated[
        Path,
        typer.Argument(metavar="A.json", help="The first report (A), written by a bench command's --json."),
    ],
    b: Annotated[
        Path, typer.Argument(metavar="B.json", help="The second report (B), of the same bench command.")
    ],
    noise: Annotated[
        float,
        typer.Option(
            "--noise",
            help="Percent: a time or rate whose B / A is within this of 1 is 'within noise', neither better "
            "nor worse. The default is one configuration's run-to-run spread on a GPU; the 2-core CPU "
            "machine of docs/benchmarks.md needs about 12.",
            min=0.0,
        ),
    ] = DEFAULT_NOISE_PERCENT,
) -> None:
    """Compare two --json reports of the same benchmark, metric by metric, with the ratio B / A.

    Each metric of A and B side by side, B / A, and whether B did better (rates: higher is better; times
    and latencies: lower), or moved by no more than --noise percent (within noise). Results are matched by
    system (offline), system and batch size (latency), cache type (prefix); a serve report has one.
    Settings that differ between the two runs are listed under the table.

    Example: minisgl bench compare before.json after.json --noise 12
    """
    from minisgl_cli.bench.compare import (
        compare_reports,
        comparison_notes,
        comparison_table,
        load_report,
        noise_line,
    )

    comparison = compare_reports(load_report(a), load_report(b), noise=noise / 100)
    table = comparison_table(comparison)
    ui.console.print(Text(f"bench compare ({comparison.kind}): A = {a}, B = {b}"), soft_wrap=True)
    ui.print_table(None, table.columns, table.rows)
    ui.console.print(Text(noise_line(comparison)), soft_wrap=True)
    for note in comparison_notes(comparison):
        ui.console.print(Text(note, style="yellow"), soft_wrap=True)


# ---- shared steps


def _setup(engine: EngineConfig) -> _Setup:
    from minisgl_cli.engine.builder import run_model_config
    from minisgl_cli.engine.device import resolve_device, resolve_dtype
    from minisgl_cli.model_source import resolve_model

    source = resolve_model(engine.model, engine.dummy_weights)
    device = resolve_device(engine.device)
    model_config = run_model_config(engine, source.hf_config)
    return _Setup(source, model_config, device, resolve_dtype(engine.dtype, device))


def _load_hf(engine: EngineConfig, setup: _Setup) -> PreTrainedModel:
    import torch

    from minisgl_cli.bench.hf_baseline import load_hf_model

    # The engine of the run before is garbage by now; collect it so its weights and KV pool are really freed.
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return load_hf_model(
        setup.source,
        dummy_weights=engine.dummy_weights,
        dtype=setup.dtype,
        device=setup.device,
        seed=engine.random_seed,
    )


@contextmanager
def _progress(label: str, total: int, unit: str | None = None) -> Iterator[Progress]:
    """A transient progress bar on stderr, of `total` units ("tok": its rate reads tok/s; None: items);
    yields the callback that advances it."""
    with ui.progress(transient=True) as bar:
        task = bar.add_task(label, total=total, unit=unit)
        yield lambda n: bar.advance(task, n)


def _print(title: str, table: TableData, comparisons: list[Comparison]) -> None:
    from minisgl_cli.bench.report import ratio_lines

    ui.print_table(title, table.columns, table.rows)
    for line in ratio_lines(comparisons):
        ui.console.print(line, highlight=False, soft_wrap=True)


def _report_config(
    engine: EngineConfig, setup: _Setup, baseline: str | None, bench: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": setup.source.name,
        "dummy_weights": engine.dummy_weights,
        "device": str(setup.device),
        "dtype": str(setup.dtype).removeprefix("torch."),
        "baseline": baseline,
        "engine": dataclasses.asdict(engine),
        "bench": bench,
    }


def _offline_workload(cfg: LoadedConfig, setup: _Setup) -> Workload:
    from minisgl_cli.bench.workload import load_workload
    from minisgl_cli.engine.builder import load_tokenizer

    return load_workload(
        cfg.config.bench,
        setup.model_config.vocab_size,
        lambda: load_tokenizer(setup.source),
        # A dataset file runs whole unless a number of prompts was asked for (the default is the random one's).
        whole_file=cfg.sources["num_prompts"] == "default",
    )


def _check_outputs(json_path: Path | None, plot_path: Path | None) -> None:
    """Refuse an unwritable --json or --plot destination (or --plot without matplotlib) before the run, not
    after it."""
    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path is None:
            continue
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a directory: give a file path")
        if not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")
    if plot_path is not None:
        from minisgl_cli.bench.plot import check_plot_target

        check_plot_target(plot_path)


def _save_plot(path: Path, figure: Figure) -> None:
    from minisgl_cli.bench.plot import save

    save(figure, path)
    ui.err_console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _write(path: Path, report: dict[str, Any]) -> None:
    from minisgl_cli.bench.report import write_report

    write_report(path, report)
    ui.err_console.print(f"wrote {path}", highlight=False, soft_wrap=True)
