"""Starting tensor-parallel ranks: the checks before any starts, where each rank runs and how the ranks meet,
and the child processes that hold ranks 1..N-1 of an in-process engine (`LLM(tp=N)`).

Rank r runs on GPU `local_rank` of its machine (cuda:local_rank; on one machine local_rank = r), or on the
CPU, where the ranks share the cores. They meet at a file:// address on one machine or tcp://HOST:PORT
across machines, then form the model's group (NCCL on GPUs, gloo on CPU) and a gloo CPU group
(distributed.py). `minisgl serve` starts its ranks in server/launch.py; the in-process engine's caller is
rank 0 and `Followers` starts the rest.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from minisgl_cli.config import EngineConfig
from minisgl_cli.errors import MinisglError, UsageError
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.distributed import TPGroup
    from minisgl_cli.engine.rank_sync import RankLeader
    from minisgl_cli.model_source import ModelSource

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Debugging on a machine with one GPU: every rank on cuda:0, gloo for the model's collectives (NCCL refuses
# two ranks on one GPU) and so no CUDA graphs (gloo collectives cannot be captured). Slow; for correctness.
ONE_GPU_ENV = "MINISGL_TP_ONE_GPU"
FOLLOWER_STOP_S = 10.0  # a follower gets this long to leave its loop after rank 0 stops, then is killed
_JOINING = "joining"  # a follower's first message: it is about to enter the rendezvous


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs and how it finds the others."""

    rank: int
    size: int
    local_rank: int  # its GPU on its machine: cuda:local_rank
    init_method: str  # file:// on one machine, tcp://HOST:PORT across machines


def check_tp(cfg: EngineConfig, source: ModelSource, ranks_here: int) -> None:
    """Refuse a tensor-parallel set-up that cannot work, before any rank starts: more ranks on this machine
    than GPUs, one GPU named for several ranks, or a model whose heads or MLP do not split over the ranks."""
    from minisgl_cli.engine.builder import run_model_config
    from minisgl_cli.engine.distributed import TPGroup

    model_config = run_model_config(cfg, source.hf_config)
    if cfg.tp == 1:
        return
    import torch

    from minisgl_cli.engine.device import resolve_device

    device = resolve_device(cfg.device)
    if device.type == "cuda" and not one_gpu():
        if device.index is not None:
            raise UsageError(
                f"--device {cfg.device} names one GPU, but --tp {cfg.tp} runs each rank on a GPU of its own: "
                "use --device cuda (or auto) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        count = torch.cuda.device_count()
        if ranks_here > count:
            where = "" if ranks_here == cfg.tp else " on this node"
            raise UsageError(
                f"--tp {cfg.tp} runs {plural(ranks_here, 'rank')}{where}, one per GPU, but CUDA sees "
                f"{plural(count, 'GPU')}"
            )
    model_config.for_rank(TPGroup(rank=0, size=cfg.tp))


def join(cfg: EngineConfig, place: RankPlace) -> tuple[EngineConfig, TPGroup]:
    """Join the other ranks: the engine settings for this rank (its GPU) and its group."""
    import torch

    from minisgl_cli.engine.device import resolve_device
    from minisgl_cli.engine.distributed import TPGroup, init_tp

    if place.size == 1:
        return cfg, TPGroup.single()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0 if one_gpu() else place.local_rank)
        torch.cuda.set_device(device)
        cfg = replace(cfg, device=str(device))
    else:  # the ranks share the cores: more threads than cores each would only make them fight
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // place.size))
    backend = "nccl" if device.type == "cuda" and not one_gpu() else "gloo"
    return cfg, init_tp(place.rank, place.size, place.init_method, backend, device=device)


def one_gpu() -> bool:
    """Whether MINISGL_TP_ONE_GPU=1 puts every rank on cuda:0 over gloo (see ONE_GPU_ENV)."""
    return os.environ.get(ONE_GPU_ENV, "") == "1"


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (a no-op where prctl is unavailable)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:  # no glibc (e.g. musl): callers keep their own checks
            pass


class Followers:
    """Ranks 1..N-1 of an in-process engine, one child process each: it joins the group, builds its share
    of the engine and replays rank 0's scheduler (rank_sync.follow) until `stop`. This process is rank 0 and
    joins at `place0` once `wait_joining` returned."""

    def __init__(self, cfg: EngineConfig, source: ModelSource) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="minisgl-tp-")
        init_method = f"file://{self._dir.name}/rendezvous"
        self.place0 = RankPlace(0, cfg.tp, 0, init_method)
        mp = multiprocessing.get_context("spawn")  # not fork: this process may hold CUDA or threads
        self._ranks: list[tuple[BaseProcess, Connection]] = []
        for r in range(1, cfg.tp):
            receiver, sender = mp.Pipe(duplex=False)
            process = mp.Process(
                target=_follower_main,
                args=(cfg, source, RankPlace(r, cfg.tp, r, init_method), sender),
                name=f"minisgl-rank-{r}",
                daemon=True,
            )
            process.start()
            sender.close()
            self._ranks.append((process, receiver))

    def wait_joining(self) -> None:
        """Block until every follower is about to join the group (so this rank's join cannot wait on one
        that died first); MinisglError if one failed."""
        for r, (process, conn) in enumerate(self._ranks, start=1):
            message = self._next_message(r, process, conn, timeout=None)
            if message != _JOINING:
                raise MinisglError(message or f"tensor-parallel rank {r} stopped while starting")

    def wait_ready(self) -> None:
        """Block until every follower built its engine; MinisglError with the first failure."""
        for r, (process, conn) in enumerate(self._ranks, start=1):
            message = self._next_message(r, process, conn, timeout=None)
            if message is not None:
                raise MinisglError(message)

    def failure(self, wait_s: float) -> str | None:
        """The first failure a follower reports within `wait_s` (after this rank's own start-up failed:
        a collective error here is usually a follower's failure, which says more)."""
        deadline = time.monotonic() + wait_s
        for r, (process, conn) in enumerate(self._ranks, start=1):
            message = self._next_message(r, process, conn, timeout=max(0.0, deadline - time.monotonic()))
            if message not in (None, _JOINING, ""):
                return message
        return None

    def stop(self, leader: RankLeader | None) -> None:
        """End the followers: through `leader` (they leave their loop) when it is given, else by signal;
        anything still alive after FOLLOWER_STOP_S is killed."""
        if leader is not None:
            try:
                leader.stop()
            except RuntimeError:  # a follower already gone: the signals below end the rest
                pass
        else:
            for process, _ in self._ranks:
                if process.is_alive():
                    process.terminate()
        deadline = time.monotonic() + FOLLOWER_STOP_S
        for process, conn in self._ranks:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("%s did not stop: killing it", process.name)
                process.kill()
                process.join()
            conn.close()
        self._ranks = []
        self._dir.cleanup()

    @staticmethod
    def _next_message(r: int, process: BaseProcess, conn: Connection, timeout: float | None) -> str | None:
        """The follower's next message ("" when there is none within `timeout`), or why it died."""
        if not wait_for([conn, process.sentinel], timeout=timeout):
            return ""
        if conn.poll():
            try:
                return conn.recv()
            except EOFError:
                pass
        process.join(1.0)
        return f"tensor-parallel rank {r} exited while starting (exit status {process.exitcode})"


def _follower_main(cfg: EngineConfig, source: ModelSource, place: RankPlace, conn: Connection) -> None:
    from minisgl_cli.engine.builder import build_engine
    from minisgl_cli.engine.rank_sync import RankChannel, follow

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops this rank
    try:
        conn.send(_JOINING)
        cfg, tp = join(cfg, place)
        engine = build_engine(cfg, source, tp=tp)
    except MinisglError as exc:
        conn.send(f"tensor-parallel rank {place.rank}: {exc}")
        sys.exit(1)
    except Exception as exc:
        log.exception("tensor-parallel rank %d failed to start", place.rank)
        conn.send(f"tensor-parallel rank {place.rank} failed to start: {type(exc).__name__}: {exc}")
        sys.exit(1)
    conn.send(None)
    try:
        follow(engine.scheduler, RankChannel(tp))
    except RuntimeError:  # rank 0 died: its process reports that, if it can
        os._exit(1)  # not sys.exit: tearing down a group whose peer is gone can abort the interpreter
    tp.destroy()
