"""Sharded NF4 weights in state dicts: torch.distributed.checkpoint (DCP) saves and loads them.

FSDP2 (``fully_shard``) and tensor parallelism (``parallelize_module``) shard an NF4 weight into a DTensor
whose local tensor is an NF4Tensor (``nf4compile.sharding``). Its ``state_dict()`` entries are bitsandbytes'
layout (``weight``, ``weight.absmax``, ..., as for a whole weight: ``nf4compile.serialization``) with the
codes and scales as DTensors over the same mesh: a shard of rows holds a contiguous range of the flattened
codes and scales, so they are ``Shard(0)`` of the whole weight's flat entries. ``dcp.save`` writes them;
``dcp.load`` then ``load_state_dict`` read them back on any number of ranks whose shards keep whole blocks;
``nf4compile.load`` reads the checkpoint folder on one process (``read_dcp_checkpoint``).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Union

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from nf4compile.serialization import _TENSOR_SUFFIXES, QUANT_STATE_SUFFIX, nf4_from_state_dict, nf4_state_dict_entries
from nf4compile.tensor import NF4Tensor


def is_sharded_nf4(tensor) -> bool:
    return isinstance(tensor, DTensor) and isinstance(tensor._local_tensor, NF4Tensor)


def _shards_along_rows(key: str, weight: DTensor) -> int:
    """How many row shards ``weight`` is cut into; an error for shards that are not ranges of rows."""
    transposed = weight.to_local().transposed
    if transposed or any(p not in (Shard(0), Replicate()) for p in weight.placements):
        raise ValueError(
            f"nf4compile: cannot write {key} ({list(weight.placements)} of a{' transposed' if transposed else 'n'} "
            "NF4 weight) in bitsandbytes' layout: only shards of rows (FSDP2, ColwiseParallel) are contiguous "
            "ranges of its codes and scales. Save the model before tensor-parallelizing it, or gather it first"
        )
    return math.prod(weight.device_mesh.size(i) for i, p in enumerate(weight.placements) if p == Shard(0))


# DCP loads into tensors of the saved sizes, but the quant-state JSON's length varies with its numbers:
# sharded state dicts pad it with spaces (JSON ignores them; bitsandbytes and transformers parse it alike).
QUANT_STATE_BYTES = 512


def _padded(quant_state: Tensor) -> Tensor:
    if quant_state.numel() > QUANT_STATE_BYTES:
        raise ValueError(f"nf4compile: a quant state of {quant_state.numel()} bytes, more than {QUANT_STATE_BYTES}")
    return torch.cat([quant_state, quant_state.new_full((QUANT_STATE_BYTES - quant_state.numel(),), ord(" "))])


def sharded_state_dict_entries(key: str, weight: DTensor) -> dict[str, Tensor]:
    """bitsandbytes' entries for a sharded NF4 weight: codes and scales as DTensors of the whole weight's
    flat entries, views of this rank's shard (so ``dcp.load`` fills the weight in place)."""
    shards = _shards_along_rows(key, weight)
    local = weight.to_local()
    entries = nf4_state_dict_entries(key, local, whole_shape=list(weight.shape))
    entries[key + QUANT_STATE_SUFFIX] = _padded(entries[key + QUANT_STATE_SUFFIX])
    for name in [key, key + ".absmax", key + ".nested_absmax"]:
        if name in entries:
            part = entries[name]
            size = (part.shape[0] * shards, *part.shape[1:])
            entries[name] = DTensor.from_local(
                part, weight.device_mesh, weight.placements, run_check=False, shape=torch.Size(size),
                stride=torch._prims_common.make_contiguous_strides_for(size),
            )
    return entries


def sharded_nf4_from_state_dict(state_dict: dict, key: str, like: DTensor) -> DTensor:
    """Pop the (sharded) bitsandbytes entries of ``key`` and build a DTensor sharded like ``like``: each
    rank's NF4Tensor from its local codes and scales, checked against its shard's shape."""
    _shards_along_rows(key, like)
    names = [key + suffix for suffix in ("", *_TENSOR_SUFFIXES, QUANT_STATE_SUFFIX) if key + suffix in state_dict]
    local = {n: state_dict.pop(n) for n in names}
    local = {n: v.to_local() if isinstance(v, DTensor) else v for n, v in local.items()}
    quant_state = json.loads(bytes(local[key + QUANT_STATE_SUFFIX].cpu().tolist()).decode("utf-8"))
    if quant_state.get("shape") != list(like.shape):
        raise ValueError(f"nf4compile: {key} has shape {quant_state.get('shape')} in the checkpoint, {list(like.shape)} in the model")
    quant_state["shape"] = list(like.to_local().quant_shape)  # validate this rank's shard as a weight of its own
    local[key + QUANT_STATE_SUFFIX] = torch.tensor(list(json.dumps(quant_state).encode("utf-8")), dtype=torch.uint8)
    weight = nf4_from_state_dict(local, key).to(like.device)
    return DTensor.from_local(weight, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def tensor_parallel_plan(model) -> dict:
    """``parallelize_module``'s plan for a transformers model, from its config's ``base_model_tp_plan``
    (Llama, Mistral, Qwen2, ...: q/k/v/gate/up ``ColwiseParallel``, o/down ``RowwiseParallel``)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    if not plan:
        raise ValueError(f"nf4compile: {type(model).__name__} has no config.base_model_tp_plan; write the plan by hand")
    unknown = sorted({style for style in plan.values() if style not in styles})
    if unknown:
        raise ValueError(f"nf4compile: tensor-parallel styles {unknown} of {type(model).__name__}; only colwise and rowwise are mapped")
    return {f"{model.base_model_prefix}.{pattern}": styles[style]() for pattern, style in plan.items()}


class AllGatherBytes(TorchDispatchMode):
    """Records the bytes each all-gather delivers while active (``with AllGatherBytes() as gathered:``):
    to check what FSDP2 sends, e.g. that NF4 weights travel as codes and scales."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and "allgather" in func.name():  # c10d::_allgather_base_(output, input, ...)
            output = args[0]
            self.sizes.append(output.numel() * output.element_size())
        return func(*args, **(kwargs or {}))


def read_dcp_checkpoint(path: Union[str, os.PathLike]) -> dict[str, Tensor]:
    """Every tensor of a DCP checkpoint folder, whole, on the CPU of one process (no process group needed):
    for a model saved sharded with nf4compile, exactly the entries ``nf4compile.save`` would have written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(os.fspath(path))
    state_dict = {
        name: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process")
        dcp.load(state_dict, storage_reader=reader, no_dist=True)
    return state_dict
