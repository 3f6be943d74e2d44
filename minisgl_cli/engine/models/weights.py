"""Filling a model's parameters: from HF safetensors checkpoints, or with seeded random (dummy) values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from minisgl_cli.engine.layers.linear import MergedLinear
from minisgl_cli.engine.models.llama import LlamaForCausalLM
from minisgl_cli.errors import MinisglError

# Checkpoint tensors that are derived data, not weights (we recompute them).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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


def iter_checkpoint(weights_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(weights_dir):
        if not path.is_file():
            raise MinisglError(f"weight shard {path} named in the checkpoint index is missing")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def load_weights(model: LlamaForCausalLM, weights_dir: Path) -> None:
    """Copy an HF checkpoint into `model`, fusing q/k/v and gate/up parts into their merged parameters.

    Every parameter must be covered exactly once; a missing, unknown or misshapen tensor is an error
    (it would otherwise surface as a silently wrong model).
    """
    params = dict(model.named_parameters())  # a tied lm_head shares, and is listed as, the embedding
    loaded = dict.fromkeys(params, 0)
    tied = model.config.tie_word_embeddings
    for name, tensor in iter_checkpoint(weights_dir):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, part = _our_name(model, name)
        if target not in params:
            raise MinisglError(f"unexpected tensor {name!r} in the checkpoint at {weights_dir}")
        dest = params[target]
        if part is not None:
            module = model.get_submodule(target.rsplit(".", 1)[0])
            assert isinstance(module, MergedLinear)
            dest = module.shard(dest, part)
        if dest.shape != tensor.shape:
            raise MinisglError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model config expects {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded[target] += tensor.numel()
    missing = [n for n, p in params.items() if loaded[n] != p.numel()]
    if missing:
        raise MinisglError(
            f"the checkpoint at {weights_dir} lacks {len(missing)} weights, e.g. {missing[0]!r}"
        )


def _our_name(model: LlamaForCausalLM, name: str) -> tuple[str, str | None]:
    """HF tensor name -> (our parameter name, part of a merged parameter or None)."""
    *prefix, module, kind = name.split(".")
    if module in model.packed_modules:
        fused, part = model.packed_modules[module]
        return ".".join([*prefix, fused, kind]), part
    return name, None


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights at the model's real shape, the same for the same seed and device.

    Norm scales are 1 and the rest N(0, 0.02) (the usual init), which keeps activations and logits
    finite through deep models, so dummy runs exercise the same kernels with realistic magnitudes.
    """
    generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
