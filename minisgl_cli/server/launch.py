"""`minisgl serve`'s process topology: start the engine processes, wait until each is ready, serve HTTP,
and stop everything on the way out.

    this process: API (FastAPI on uvicorn, asyncio) + a watchdog thread over the children
    scheduler process: model, KV cache, scheduling (scheduler_worker.py); with --tp N, N of them: the
        tensor-parallel ranks, of which rank 0 talks to the rest of the server and the others to rank 0 only
    tokenizer worker x --num-tokenizers: prompts -> ids, tokens -> text (tokenizer_worker.py)

They talk over ZMQ ipc:// sockets in a private temporary directory, where the ranks also meet to form their
torch.distributed group (gloo on the CPU, NCCL on GPUs, rank r on cuda:r). The HTTP port is bound first (a
port in use fails at once, before the model loads) but only listens once every process has said it is ready.
SIGINT/SIGTERM stop the listener, let in-flight requests finish (uvicorn's graceful shutdown), then stop the
children. A child that dies turns /health to 503, fails what was in flight, and the server exits with
status 1 shortly after, rather than hanging on a dead engine.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from types import FrameType

import zmq

from minisgl_cli.config import Config, EngineConfig
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.model_source import ModelSource, resolve_model
from minisgl_cli.server.engine_client import EngineClient, IpcAddresses
from minisgl_cli.server.messages import Failed, Ready, unpack

log = logging.getLogger("minisgl.serve")

# How long /health reports 503 after an engine process died, before the server exits (lets a load
# balancer or supervisor see the failure through the API as well as through the exit status).
DEATH_GRACE_S = 2.0
GRACEFUL_SHUTDOWN_S = 30  # in-flight requests get this long to finish after SIGINT/SIGTERM
BACKLOG = 2048
CHILD_STOP_S = 10.0  # then each child this long to exit on SIGTERM before it is killed
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class _Child:
    role: str
    process: BaseProcess


def serve(config: Config, log_level: str) -> int:
    """Run the server until it is stopped; the exit status (0 after SIGINT/SIGTERM)."""
    engine_cfg, server_cfg = config.engine, config.server
    listener = _bind(server_cfg.host, server_cfg.port)
    try:
        if server_cfg.host not in _LOOPBACK and server_cfg.api_key is None:
            log.warning(
                "listening on %s without --api-key: anyone who can reach this port can use the model",
                server_cfg.host,
            )
        source = resolve_model(engine_cfg.model, engine_cfg.dummy_weights)  # converts a GGUF once, here
        _check_tp(engine_cfg, source)
        vocab_size = int(source.hf_config["vocab_size"])
        with tempfile.TemporaryDirectory(prefix="minisgl-") as ipc_dir:
            addresses = IpcAddresses.in_dir(ipc_dir, server_cfg.num_tokenizers)
            ctx = zmq.Context()
            ready = ctx.socket(zmq.PULL)
            ready.bind(addresses.ready)
            children = _spawn(config, source, vocab_size, addresses, log_level, ipc_dir)
            try:
                with _sigterm_interrupts():
                    info = _wait_ready(ready, children, engine_role=children[0].role)
                ctx.destroy(linger=0)
                return _serve_http(listener, addresses, info, children, config)
            finally:
                _stop(children)
    finally:
        listener.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(False)
    return sock


def _check_tp(cfg: EngineConfig, source: ModelSource) -> None:
    """Refuse a tensor-parallel size that cannot work before any process starts: more ranks than GPUs, one
    GPU named for several ranks, or a model whose heads or MLP do not split over the ranks."""
    if cfg.tp == 1:
        return
    import torch

    from minisgl_cli.engine.device import resolve_device
    from minisgl_cli.engine.distributed import TPGroup
    from minisgl_cli.engine.models.config import ModelConfig

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if device.index is not None:
            raise UsageError(
                f"--device {cfg.device} names one GPU, but --tp {cfg.tp} runs rank r on cuda:r: "
                "use --device cuda (or auto) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        count = torch.cuda.device_count()
        if cfg.tp > count:
            raise UsageError(f"--tp {cfg.tp} needs {cfg.tp} GPUs, one per rank, but {count} are visible")
    ModelConfig.from_hf(source.hf_config).for_rank(TPGroup(rank=0, size=cfg.tp))


def _spawn(
    config: Config,
    source: ModelSource,
    vocab_size: int,
    addresses: IpcAddresses,
    log_level: str,
    ipc_dir: str,
) -> list[_Child]:
    # Heavy modules (torch) load only in the children that need them.
    from minisgl_cli.server.scheduler_worker import Rank, scheduler_main
    from minisgl_cli.server.tokenizer_worker import tokenizer_main

    # spawn, not fork: this process may have imported torch or started threads, which fork cannot copy safely.
    mp = multiprocessing.get_context("spawn")
    tp = config.engine.tp
    children = []
    for r in range(tp):  # rank 0 first: its Ready describes the engine
        rank = Rank("scheduler" if tp == 1 else f"scheduler-{r}", r, tp, f"file://{ipc_dir}/tp-init")
        children.append(
            _Child(
                rank.role,
                mp.Process(
                    target=scheduler_main,
                    args=(config.engine, source, addresses, config.server.max_queue, log_level, rank),
                    name=f"minisgl-{rank.role}",
                ),
            )
        )
    for i in range(config.server.num_tokenizers):
        children.append(
            _Child(
                f"tokenizer-{i}",
                mp.Process(
                    target=tokenizer_main,
                    args=(i, source.path, vocab_size, addresses, log_level),
                    name=f"minisgl-tokenizer-{i}",
                ),
            )
        )
    for child in children:
        child.process.start()
    return children


def _wait_ready(ready: zmq.Socket, children: list[_Child], engine_role: str) -> Ready:
    """Block until every child reported Ready; the Ready of `engine_role` (the scheduler, or its rank 0).
    MinisglError if one fails or dies."""
    pending = {child.role for child in children}
    info: Ready | None = None
    while pending:
        if ready.poll(200):
            message = unpack(ready.recv())
            if isinstance(message, Failed):
                raise MinisglError(message.message)
            pending.discard(message.role)
            if message.role == engine_role:
                info = message
            continue
        for child in children:
            if child.role in pending and not child.process.is_alive():
                raise MinisglError(
                    f"the {child.role} process exited while starting ({_exit_status(child.process)})"
                )
    assert info is not None
    return info


def _log_startup(info: Ready, children: list[_Child], listener: socket.socket, config: Config) -> None:
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tp = config.engine.tp
    log.info(
        "model %s: %s on %s, KV cache %s tokens, context length %s",
        config.server.served_model_name or info.model_name,
        info.dtype,
        info.device if tp == 1 else f"{tp} {info.device.split(':')[0]} ranks (tensor parallel)",
        f"{info.kv_tokens:,}",
        f"{info.context_length:,}",
    )
    log.info("processes: %s", ", ".join(f"{c.role} (pid {c.process.pid})" for c in children))
    log.info("Listening on http://%s:%d (OpenAI API under /v1; Ctrl-C stops)", shown, port)


def _serve_http(
    listener: socket.socket, addresses: IpcAddresses, info: Ready, children: list[_Child], config: Config
) -> int:
    import uvicorn

    from minisgl_cli.server.api import ApiSettings, create_app

    engine = EngineClient(addresses, info)
    settings = ApiSettings(
        served_model_name=config.server.served_model_name or info.model_name,
        api_key=config.server.api_key,
        sampling_defaults=config.sampling,
    )
    debug = log.getEffectiveLevel() <= logging.DEBUG
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, settings),
            log_level="info" if debug else "warning",
            access_log=debug,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    death: list[str] = []
    stop_watching = threading.Event()
    watchdog = threading.Thread(
        target=_watch, args=(children, engine, server, death, stop_watching), daemon=True, name="watchdog"
    )
    watchdog.start()
    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them after its graceful shutdown; these
    # handlers make that re-raise a no-op, so the children are still stopped (in serve's finally) and the
    # status is 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Listening from here on: connections made before uvicorn's loop accepts them wait in the backlog.
    listener.listen(BACKLOG)
    _log_startup(info, children, listener, config)
    try:
        server.run(sockets=[listener])
    finally:
        stop_watching.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if death:
        raise MinisglError(death[0])
    return 0


def _watch(
    children: list[_Child],
    engine: EngineClient,
    server: object,
    death: list[str],
    stop: threading.Event,
) -> None:
    sentinels = {child.process.sentinel: child for child in children}
    while not stop.is_set():
        ended = wait_for_sentinels(list(sentinels), timeout=0.5)
        if not ended or stop.is_set():
            continue
        # Name every child found dead: when one tensor-parallel rank dies its peers soon fail too, and the
        # first of them to be noticed need not be the cause.
        dead = [sentinels[sentinel] for sentinel in ended]  # type: ignore[index]
        for child in dead:
            child.process.join(1.0)  # a sentinel fires before the child is reaped: then its status is known
        deaths = ", ".join(f"the {c.role} process died ({_exit_status(c.process)})" for c in dead)
        reason = f"{deaths}; the server stopped"
        log.error("%s", reason)
        death.append(reason)
        engine.mark_dead(reason)
        time.sleep(DEATH_GRACE_S)
        server.should_exit = True  # type: ignore[attr-defined]
        return


def _exit_status(process: BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _stop(children: list[_Child]) -> None:
    for child in children:
        if child.process.is_alive():
            child.process.terminate()
    deadline = time.monotonic() + CHILD_STOP_S
    for child in children:
        child.process.join(max(0.0, deadline - time.monotonic()))
        if child.process.is_alive():
            log.warning("the %s process did not stop on SIGTERM: killing it", child.role)
            child.process.kill()
            child.process.join()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the engine starts, SIGTERM interrupts like Ctrl-C does, so the children are stopped too."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _ignore(signum: int, frame: FrameType | None) -> None:
    pass
