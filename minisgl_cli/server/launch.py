"""`minisgl serve`'s process topology: start the engine processes, wait until each is ready, serve HTTP,
and stop everything on the way out.

    this process: API (FastAPI on uvicorn, asyncio) + a watchdog thread over the children
    scheduler process: model, KV cache, scheduling (scheduler_worker.py); with --tp N, N of them: the
        tensor-parallel ranks, of which rank 0 talks to the rest of the server and the others to rank 0 only
    tokenizer worker x --num-tokenizers: prompts -> ids, tokens -> text (tokenizer_worker.py)

They talk over ZMQ ipc:// sockets in a private temporary directory, where the ranks also meet to form their
torch.distributed group (gloo on the CPU, NCCL on GPUs, rank r on cuda:r). Across machines (--nnodes N) every
node runs tp/N ranks and they meet at --dist-init-addr; only node 0 runs the API and the tokenizers, and a
node other than 0 runs just its ranks, until node 0 stops them. The HTTP port is bound first (a
port in use fails at once, before the model loads) but only listens once every process has said it is ready.
SIGINT/SIGTERM stop the listener, let in-flight requests finish (uvicorn's graceful shutdown), then stop the
children. A child that dies turns /health to 503, fails what was in flight, and the server exits with
status 1 shortly after, rather than hanging on a dead engine.

Every process logs to the same stderr in one format (log_format.py), naming its role: "api" (this process on
node 0; "node-N" on another node), "scheduler" (or "scheduler-R"), "tokenizer-I"; uvicorn's loggers go
through the same handler. At the default level the log has one start-up line (what is served, where), the
access log (access_log.py), rank 0's state line while requests run (state_log.py) and its summary at
shutdown.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from types import FrameType

import zmq

from minisgl_cli import log_format
from minisgl_cli.config import Config, LoadedConfig
from minisgl_cli.engine.tp_ranks import RankPlace, check_tp
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.generation_config import with_generation_config
from minisgl_cli.model_source import ModelSource, resolve_model
from minisgl_cli.server.engine_client import EngineClient, IpcAddresses
from minisgl_cli.server.messages import Failed, Ready, unpack
from minisgl_cli.wording import plural

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


@dataclass(frozen=True)
class Nodes:
    """How the --tp ranks spread over machines: each of `nnodes` runs tp/nnodes consecutive ranks, node 0
    the first ones (rank 0 among them) and the HTTP server."""

    tp: int
    nnodes: int
    node_rank: int
    init_addr: str | None  # HOST:PORT where the ranks meet across machines

    @classmethod
    def of(cls, config: Config) -> Nodes:
        """The layout the config asks for; UsageError for one that cannot work."""
        tp, server = config.engine.tp, config.server
        nnodes, node_rank = server.nnodes, server.node_rank
        if node_rank >= nnodes:
            raise UsageError(f"--node-rank {node_rank} is outside --nnodes {nnodes} (0 to {nnodes - 1})")
        if nnodes > 1 and server.dist_init_addr is None:
            raise UsageError(
                f"--nnodes {nnodes} needs --dist-init-addr HOST:PORT: node 0's address and a free port there, "
                "the same on every node"
            )
        if tp % nnodes:
            raise UsageError(
                f"--tp {tp} does not split over --nnodes {nnodes}: every node runs the same number of ranks"
            )
        return cls(tp, nnodes, node_rank, server.dist_init_addr if nnodes > 1 else None)

    @property
    def ranks_per_node(self) -> int:
        return self.tp // self.nnodes

    def places(self, ipc_dir: str) -> list[RankPlace]:
        """This node's ranks: GPU i of the node runs rank node_rank * ranks_per_node + i."""
        init = f"tcp://{self.init_addr}" if self.init_addr is not None else f"file://{ipc_dir}/tp-init"
        first = self.node_rank * self.ranks_per_node
        return [RankPlace(first + i, self.tp, i, init) for i in range(self.ranks_per_node)]


def serve(loaded: LoadedConfig, log_level: str) -> int:
    """Run the server until it is stopped; the exit status (0 after SIGINT/SIGTERM). On a node other than
    0 of a multi-node set-up, run this node's ranks until node 0 stops them.

    `loaded` says where each setting came from, so the model's generation_config.json can fill in the
    sampling defaults of requests that no file, env or flag set (generation_config.py)."""
    config = loaded.config
    engine_cfg, server_cfg = config.engine, config.server
    nodes = Nodes.of(config)
    log_format.set_role("api" if nodes.node_rank == 0 else f"node-{nodes.node_rank}")
    if nodes.node_rank > 0:
        return _serve_ranks(config, nodes, log_level)
    listener = _bind(server_cfg.host, server_cfg.port)
    try:
        if server_cfg.host not in _LOOPBACK and server_cfg.api_key is None:
            log.warning(
                "listening on %s without --api-key: anyone who can reach this port can use the model",
                server_cfg.host,
            )
        source = resolve_model(engine_cfg.model, engine_cfg.dummy_weights)  # converts a GGUF once, here
        check_tp(engine_cfg, source, nodes.ranks_per_node)
        config = with_generation_config(loaded, source.path).config
        log.debug("request sampling defaults: %s", config.sampling)
        if nodes.nnodes > 1:
            log.info(
                "waiting for the other %s, %s, to join at %s",
                plural(nodes.nnodes - 1, "node"),
                plural(nodes.tp - nodes.ranks_per_node, "rank"),
                nodes.init_addr,
            )
        with _engine_processes(config, nodes, source, log_level, server_cfg.num_tokenizers) as started:
            return _serve_http(listener, *started, config, source)
    finally:
        listener.close()


def _serve_ranks(config: Config, nodes: Nodes, log_level: str) -> int:
    """A node other than 0: its ranks only (no HTTP, no tokenizers), until rank 0 on node 0 stops them
    (status 0), one of them dies (1), or SIGINT/SIGTERM stops this node (0; node 0 then fails)."""
    source = resolve_model(config.engine.model, config.engine.dummy_weights)
    check_tp(config.engine, source, nodes.ranks_per_node)
    log.info("node %d of %d: joining node 0 at %s", nodes.node_rank, nodes.nnodes, nodes.init_addr)
    try:
        with (
            _engine_processes(config, nodes, source, log_level, 0) as (_, info, children),
            _sigterm_interrupts(),
        ):
            log.info(
                "node %d: rank(s) %s ready on %s (KV cache %s tokens); node 0 serves HTTP",
                nodes.node_rank,
                ", ".join(c.role.removeprefix("scheduler-") for c in children),
                info.device.split(":")[0],
                f"{info.kv_tokens:,}",
            )
            log.info("processes: %s", ", ".join(f"{c.role} (pid {c.process.pid})" for c in children))
            return _wait_ranks(children)
    except KeyboardInterrupt:
        log.info("node %d: stopping", nodes.node_rank)
        return 0


@contextmanager
def _engine_processes(
    config: Config, nodes: Nodes, source: ModelSource, log_level: str, num_tokenizers: int
) -> Iterator[tuple[IpcAddresses, Ready, list[_Child]]]:
    """This node's scheduler ranks (lowest first) and `num_tokenizers` tokenizer workers, started and ready,
    for the block: (their ZMQ addresses, the lowest rank's Ready, the processes). MinisglError if one fails
    to start; all of them are stopped when the block ends."""
    with tempfile.TemporaryDirectory(prefix="minisgl-") as ipc_dir:
        addresses = IpcAddresses.in_dir(ipc_dir, num_tokenizers)
        ctx = zmq.Context()
        ready = ctx.socket(zmq.PULL)
        ready.bind(addresses.ready)
        children = _spawn_ranks(config, source, addresses, log_level, nodes.places(ipc_dir))
        if num_tokenizers:
            vocab_size = int(source.hf_config["vocab_size"])
            children += _spawn_tokenizers(config, source, vocab_size, addresses, log_level)
        try:
            with _sigterm_interrupts():
                info = _wait_ready(ready, children, engine_role=children[0].role)
            ctx.destroy(linger=0)
            yield addresses, info, children
        finally:
            _stop(children)


def _wait_ranks(children: list[_Child]) -> int:
    """Wait until every rank of this node exited: 0 when all of them did so cleanly (node 0 stopped them)."""
    pending = list(children)
    while pending:
        wait_for_sentinels([c.process.sentinel for c in pending])
        for child in [c for c in pending if not c.process.is_alive()]:
            child.process.join()
            pending.remove(child)
            if child.process.exitcode != 0:
                raise MinisglError(
                    f"the {child.role} process died ({_exit_status(child.process)}): "
                    "node 0 or another rank is gone; this node stopped"
                )
    log.info("node 0 stopped the server; this node's ranks exited")
    return 0


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


def _spawn_ranks(
    config: Config, source: ModelSource, addresses: IpcAddresses, log_level: str, places: list[RankPlace]
) -> list[_Child]:
    """Start this node's scheduler processes, its lowest rank first (on node 0 rank 0, whose Ready
    describes the engine)."""
    from minisgl_cli.server.scheduler_worker import Rank, scheduler_main

    children = []
    for place in places:
        rank = Rank("scheduler" if place.size == 1 else f"scheduler-{place.rank}", place)
        children.append(
            _start(
                rank.role,
                scheduler_main,
                (
                    config.engine,
                    source,
                    addresses,
                    config.server.max_queue,
                    config.server.log_interval,
                    log_level,
                    rank,
                ),
            )
        )
    return children


def _spawn_tokenizers(
    config: Config, source: ModelSource, vocab_size: int, addresses: IpcAddresses, log_level: str
) -> list[_Child]:
    from minisgl_cli.server.tokenizer_worker import context_bound, tokenizer_main

    context = context_bound(config.engine, source)  # to refuse a prompt far over it before tokenizing it all
    return [
        _start(f"tokenizer-{i}", tokenizer_main, (i, source, vocab_size, addresses, log_level, context))
        for i in range(config.server.num_tokenizers)
    ]


def _start(role: str, target: Callable[..., None], args: tuple[object, ...]) -> _Child:
    # spawn, not fork: this process may have imported torch or started threads, which fork cannot copy safely.
    # Heavy modules (torch) load only in the children that need them.
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, name=f"minisgl-{role}")
    process.start()
    return _Child(role, process)


def _wait_ready(ready: zmq.Socket, children: list[_Child], engine_role: str) -> Ready:
    """Block until every child reported Ready; the Ready of `engine_role` (the scheduler, or its rank 0).
    MinisglError if one fails or dies."""
    pending = {child.role for child in children}
    info: Ready | None = None
    while pending:
        if ready.poll(200):
            message = unpack(ready.recv())
            if isinstance(message, Failed):
                # The child's error class does not cross the process boundary; its exit status does.
                raise (UsageError if message.exit_code == UsageError.exit_code else MinisglError)(
                    message.message
                )
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


def _log_startup(
    info: Ready, children: list[_Child], listener: socket.socket, config: Config, parsers: str
) -> None:
    """The one start-up line: what is served, on what, where (the URL last, where the eye lands)."""
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tp, nnodes = config.engine.tp, config.server.nnodes
    if tp == 1:
        placed = f"{info.device}, tp 1"
    else:
        placed = f"{tp} {info.device.split(':')[0]} ranks (tensor parallel)"
        placed += f" over {nnodes} nodes" if nnodes > 1 else ""
    log.info(
        "serving %s: %s on %s, KV cache %s tokens, max %d running requests, context length %s, %s; "
        "processes: %s. Listening on http://%s:%d (OpenAI API under /v1; Ctrl-C stops)",
        config.server.served_model_name or info.model_name,
        info.dtype,
        placed,
        f"{info.kv_tokens:,}",
        config.engine.max_running_requests,
        f"{info.context_length:,}",
        parsers,
        ", ".join(f"{c.role} (pid {c.process.pid})" for c in children),
        shown,
        port,
    )


def _serve_http(
    listener: socket.socket,
    addresses: IpcAddresses,
    info: Ready,
    children: list[_Child],
    config: Config,
    source: ModelSource,
) -> int:
    import uvicorn

    from minisgl_cli.server.access_log import AccessLog
    from minisgl_cli.server.api import ApiSettings, create_app
    from minisgl_cli.server.output_parsers import pick_parsers

    engine = EngineClient(addresses, info)
    tool_parser, reasoning_parser = pick_parsers(config.server, source)
    parsers = f"tool-call parser {tool_parser or 'none'}, reasoning parser {reasoning_parser or 'none'}"
    settings = ApiSettings(
        served_model_name=config.server.served_model_name or info.model_name,
        api_key=config.server.api_key,
        sampling_defaults=config.sampling,
        tool_call_parser=tool_parser,
        reasoning_parser=reasoning_parser,
        max_request_bytes=config.server.max_request_bytes,
    )
    debug = log.getEffectiveLevel() <= logging.DEBUG
    server = uvicorn.Server(
        uvicorn.Config(
            AccessLog(create_app(engine, settings), enabled=config.server.access_log),
            # log_config None: uvicorn's loggers keep no handlers of their own and reach the root's, in the
            # common format. Its start-up and shutdown lines at info are the ones _log_startup replaces.
            log_config=None,
            log_level="info" if debug else "warning",
            access_log=False,  # AccessLog's lines instead: they have the duration
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    death: list[str] = []
    stop_watching = threading.Event()
    watchdog = threading.Thread(
        target=_watch,
        args=(children, engine, server, death, stop_watching, config.server.nnodes > 1),
        daemon=True,
        name="watchdog",
    )
    watchdog.start()
    # uvicorn captures SIGINT/SIGTERM while it runs and re-raises them after its graceful shutdown; these
    # handlers make that re-raise a no-op, so the children are still stopped (in serve's finally) and the
    # status is 0.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Listening from here on: connections made before uvicorn's loop accepts them wait in the backlog.
    listener.listen(BACKLOG)
    _log_startup(info, children, listener, config, parsers)
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
    multi_node: bool,
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
        # A rank on another node is not this node's child: when one dies, rank 0 is the death seen here.
        elsewhere = "; a rank on another node may have died first (see that node's log)" if multi_node else ""
        reason = f"{deaths}{elsewhere}; the server stopped"
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
