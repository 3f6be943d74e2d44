"""Filling a model's parameters: from HF safetensors checkpoints, or with seeded random (dummy) values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import nn

from minisgl_cli.engine.distributed import Shard, WeightSlice
from minisgl_cli.engine.layers.fp8 import dequantize
from minisgl_cli.engine.models.llama import LlamaForCausalLM
from minisgl_cli.errors import MinisglError
from minisgl_cli.wording import plural

if TYPE_CHECKING:
    from minisgl_cli.engine.models.config import Fp8Checkpoint

# Checkpoint tensors that are derived data, not weights (we recompute them).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# An FP8 checkpoint's scales beside its weights: per block (DeepSeek / Qwen3-*-FP8) or per tensor.
_FP8_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


def checkpoint_files(weights_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, else every *.safetensors."""
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [weights_dir / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(weights_dir.glob("*.safetensors"))
    if not files:
        raise MinisglError(f"no *.safetensors weights found in {weights_dir}")
    return files


class _CheckpointTensor(Protocol):
    """A tensor still in its safetensors file (safetensors' PySafeSlice): indexing reads just that part."""

    def get_shape(self) -> list[int]: ...

    def get_dtype(self) -> str: ...

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor: ...


@runtime_checkable
class _Sharded(Protocol):
    """A layer whose parameters hold pieces of unsplit tensors (the tensor-parallel layers)."""

    def weight_slices(self) -> dict[str, list[WeightSlice]]: ...


def iter_checkpoint(weights_dir: Path) -> Iterator[tuple[str, _CheckpointTensor]]:
    for path in checkpoint_files(weights_dir):
        if not path.is_file():
            raise MinisglError(f"weight shard {path} named in the checkpoint index is missing")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def _parameter_slices(model: nn.Module) -> dict[str, list[WeightSlice]]:
    """Each parameter's name -> where its pieces come from. A parameter no layer splits is whole (the
    norms); a tied lm_head is listed once, as the embedding it shares."""
    params = dict(model.named_parameters())
    slices: dict[str, list[WeightSlice]] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, _Sharded):
            for kind, pieces in module.weight_slices().items():
                if f"{prefix}.{kind}" in params:
                    slices[f"{prefix}.{kind}"] = pieces
    for name, param in params.items():
        if name not in slices:
            whole = Shard(0, param.shape[0], param.shape[0])
            slices[name] = [WeightSlice(None, 0, param, whole)]
    return slices


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, weights_dir: Path) -> None:
    """Copy an HF checkpoint into `model`, fusing q/k/v and gate/up parts into their merged parameters
    and stacking a MoE layer's per-expert tensors into its experts' parameters.

    Under tensor parallelism each rank reads only its slices from the files, never a whole tensor it
    does not own. Every parameter must be covered exactly once; a missing, unknown or misshapen tensor
    is an error (it would otherwise surface as a silently wrong model).
    """
    slices = _parameter_slices(model)
    loaded = dict.fromkeys(slices, 0)
    tied = model.config.tie_word_embeddings
    fp8 = model.config.fp8_checkpoint
    scales = _fp8_scales(weights_dir) if fp8 is not None else {}
    for name, tensor in iter_checkpoint(weights_dir):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight") or name in scales:
            continue
        target, part = _our_name(model, name)
        piece = next((s for s in slices.get(target, []) if s.part == part), None)
        if piece is None:
            raise MinisglError(f"unexpected tensor {name!r} in the checkpoint at {weights_dir}")
        expected = list(piece.dest.shape)
        expected[piece.dim] = piece.source.full
        if tensor.get_shape() != expected:
            raise MinisglError(
                f"tensor {name!r} has shape {tuple(tensor.get_shape())}, the model config expects {tuple(expected)}"
            )
        if piece.dest.is_meta:
            continue  # another rank's (an expert under expert parallelism): never read here
        src = piece.source
        index = (slice(None),) * piece.dim + (slice(src.start, src.start + src.size),)
        if tensor.get_dtype().startswith("F8"):
            piece.dest.copy_(_dequantized(name, tensor, index, scales, fp8, weights_dir))
        else:
            piece.dest.copy_(tensor[index])
        loaded[target] += piece.dest.numel()
    missing = [
        n
        for n, pieces in slices.items()
        if loaded[n] != sum(p.dest.numel() for p in pieces if not p.dest.is_meta)
    ]
    if missing:
        raise MinisglError(
            f"the checkpoint at {weights_dir} lacks {plural(len(missing), 'weight')}, e.g. {missing[0]!r}"
        )


def _fp8_scales(weights_dir: Path) -> dict[str, torch.Tensor]:
    """An FP8 checkpoint's scale tensors by name (a float per block or per tensor: small, read whole)."""
    return {name: t[:] for name, t in iter_checkpoint(weights_dir) if name.endswith(_FP8_SCALE_SUFFIXES)}


def _dequantized(
    name: str,
    tensor: _CheckpointTensor,
    index: tuple[slice, ...],
    scales: dict[str, torch.Tensor],
    fp8: Fp8Checkpoint | None,
    weights_dir: Path,
) -> torch.Tensor:
    """The float32 values of part `index` of FP8 checkpoint tensor `name`, through its scale."""
    scale = next((scales[name + s] for s in ("_scale_inv", "_scale") if name + s in scales), None)
    if fp8 is None or scale is None:
        raise MinisglError(
            f"tensor {name!r} in {weights_dir} is FP8 without a scale ({name}_scale_inv) or without an FP8 "
            "quantization_config in config.json"
        )
    block = fp8.block if scale.numel() > 1 else None
    if scale.numel() > 1 and block is None:
        raise MinisglError(
            f"{name}'s scale has {scale.numel()} entries, but config.json's quantization_config gives no "
            "weight_block_size for them"
        )
    return dequantize(tensor[index], scale, index, tensor.get_shape(), block)


def _our_name(model: LlamaForCausalLM, name: str) -> tuple[str, str | None]:
    """HF tensor name -> (our parameter name, part of a merged parameter or None).

    An expert's tensor (`...experts.<e>.<module>.weight`) goes to the experts' stacked parameter
    (`...experts.gate_up_proj`, `...experts.down_proj`: transformers' own names for them), as part
    "<e>.<part>" ("<e>" for the unmerged down projection)."""
    *prefix, module, kind = (model.renamed_modules.get(p, p) for p in name.split("."))
    expert = None
    if len(prefix) >= 2 and prefix[-2] == "experts" and prefix[-1].isdigit():
        expert = prefix.pop()
    part = None
    if module in model.packed_modules:
        module, part = model.packed_modules[module]
    if expert is not None:
        return ".".join([*prefix, module]), expert if part is None else f"{expert}.{part}"
    return ".".join([*prefix, module, kind]), part


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights at the model's real shape, the same for the same seed and device, whatever the
    number of tensor-parallel ranks (each holds its slices of the same unsplit values).

    Norm scales are 1 and the rest N(0, 0.02) (the usual init), which keeps activations and logits
    finite through deep models, so dummy runs exercise the same kernels with realistic magnitudes.
    """
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    slices = _parameter_slices(model)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        for piece in slices[name]:
            # Each checkpoint tensor is drawn whole and this rank keeps its slice, so that a rank's values
            # do not depend on how many ranks there are. A whole, contiguous piece is filled in place
            # (the same numbers, without a copy of an 8B model's largest tensors).
            src = piece.source
            if piece.dest.is_meta:  # another rank's: drawn all the same, so this rank's draws line up
                full = list(piece.dest.shape)
                full[piece.dim] = src.full
                torch.empty(full, dtype=param.dtype, device=param.device).normal_(
                    0.0, 0.02, generator=generator
                )
                continue
            if src.size == src.full and piece.dest.is_contiguous():
                piece.dest.normal_(0.0, 0.02, generator=generator)
                continue
            full = list(piece.dest.shape)
            full[piece.dim] = src.full
            whole = torch.empty(full, dtype=param.dtype, device=param.device).normal_(
                0.0, 0.02, generator=generator
            )
            piece.dest.copy_(whole.narrow(piece.dim, src.start, src.size))
