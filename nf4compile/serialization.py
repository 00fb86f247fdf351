"""bitsandbytes' state-dict layout for NF4 weights: what we write, and what we accept.

Under ``<module>.weight`` bitsandbytes (``Linear4bit._save_to_state_dict``) stores
``weight`` (packed uint8 [(n+1)//2, 1]), ``weight.absmax``, ``weight.quant_map``, and when
double-quantized ``weight.nested_absmax`` and ``weight.nested_quant_map``, plus
``weight.quant_state.bitsandbytes__nf4``: a uint8 tensor holding JSON with the rest.
transformers' bitsandbytes loader reads exactly these keys, so checkpoints move both ways.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from nf4compile import format as nf4_format
from nf4compile.ops.nf4_ops import check_scales
from nf4compile.tensor import NF4Tensor

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_TENSOR_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model or is not valid bitsandbytes NF4."""


# --- writing ----------------------------------------------------------------------------------


def nf4_state_dict_entries(key: str, weight: NF4Tensor, whole_shape: Optional[list[int]] = None) -> dict[str, Tensor]:
    """The bitsandbytes entries for an NF4 weight stored under ``key`` (e.g. ``"fc.weight"``); for a shard
    of a weight, the quant state says ``whole_shape``."""
    quant_state = {
        "quant_type": "nf4",
        "blocksize": weight.block_size,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "shape": whole_shape or list(weight.quant_shape),
    }
    entries = {
        key: weight.packed.reshape(-1, 1),
        key + ".absmax": weight.absmax,
        key + ".quant_map": nf4_format.NF4_CODEBOOK.to(weight.device, copy=True),
    }
    if weight.double_quant:
        entries[key + ".nested_absmax"] = weight.nested_absmax
        entries[key + ".nested_quant_map"] = nf4_format.DYNAMIC_MAP.to(weight.device, copy=True)
        quant_state.update(
            nested_blocksize=nf4_format.NESTED_BLOCK_SIZE,
            nested_dtype="float32",
            nested_offset=weight.offset.item(),
        )
    payload = json.dumps(quant_state).encode("utf-8")
    entries[key + QUANT_STATE_SUFFIX] = torch.tensor(list(payload), dtype=torch.uint8)
    return entries


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    key = prefix + "weight"
    weight = state_dict.get(key)
    if isinstance(weight, NF4Tensor):
        state_dict.update(nf4_state_dict_entries(key, weight))
    elif torch.distributed.is_available():
        from nf4compile import distributed

        if distributed.is_sharded_nf4(weight):  # FSDP2 / tensor parallel: entries sharded like the weight
            state_dict.update(distributed.sharded_state_dict_entries(key, weight))


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    key = prefix + "weight"
    if key + QUANT_STATE_SUFFIX in state_dict:
        if torch.distributed.is_available():
            from nf4compile import distributed

            if distributed.is_sharded_nf4(module.weight):
                state_dict[key] = distributed.sharded_nf4_from_state_dict(state_dict, key, module.weight)
                return
        weight = nf4_from_state_dict(state_dict, key)
        if getattr(module, "weight", None) is not None and module.weight.shape != weight.shape:
            weight = weight.t()  # a Conv1D holds its weight as [in, out]
        state_dict[key] = weight


def register_state_dict_hooks(module: nn.Module) -> None:
    """Make ``module.state_dict()``/``load_state_dict`` speak bitsandbytes' layout (idempotent)."""
    if getattr(module, "_nf4compile_hooks", False):
        return
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_state_dict_pre_hook)
    module._nf4compile_hooks = True


# --- reading ----------------------------------------------------------------------------------


def nf4_from_state_dict(state_dict: dict, key: str) -> NF4Tensor:
    """Pop the bitsandbytes entries of ``key`` from ``state_dict`` and build the NF4Tensor.

    Every inconsistency raises CheckpointError naming the key, so no kernel ever sees bad data.
    """

    def take(suffix: str, required: bool = True):
        name = key + suffix
        if name not in state_dict:
            if required:
                raise CheckpointError(f"{name}: missing from the checkpoint (needed for the NF4 weight {key})")
            return None
        return state_dict.pop(name)

    try:
        quant_state = json.loads(bytes(take(QUANT_STATE_SUFFIX).cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{key}{QUANT_STATE_SUFFIX}: not valid quant-state JSON ({e})") from None
    packed, absmax, quant_map = take(""), take(".absmax"), take(".quant_map")
    nested_absmax, nested_map = take(".nested_absmax", False), take(".nested_quant_map", False)

    def fail(msg: str):
        raise CheckpointError(f"{key}: {msg}")

    if quant_state.get("quant_type") != "nf4":
        fail(f"quant_type is {quant_state.get('quant_type')!r}; nf4compile reads NF4 only")
    shape = quant_state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        fail(f"quant-state shape {shape!r} is not a 2-D weight shape")
    dtype = getattr(torch, str(quant_state.get("dtype")), None)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        fail(f"quant-state dtype {quant_state.get('dtype')!r} is not float32, float16 or bfloat16")
    if not torch.equal(quant_map.cpu().float(), nf4_format.NF4_CODEBOOK):
        fail("quant_map is not the NF4 codebook")
    if (nested_absmax is None) != (nested_map is None) or (nested_absmax is not None) != ("nested_offset" in quant_state):
        fail("double-quantization entries are incomplete (need nested_absmax, nested_quant_map and nested_offset)")
    offset = None
    if nested_absmax is not None:
        if quant_state.get("nested_blocksize") != nf4_format.NESTED_BLOCK_SIZE:
            fail(f"nested_blocksize is {quant_state.get('nested_blocksize')!r}, bitsandbytes uses 256")
        if not torch.equal(nested_map.cpu().float(), nf4_format.DYNAMIC_MAP):
            fail("nested_quant_map is not bitsandbytes' signed dynamic map")
        offset = torch.tensor(float(quant_state["nested_offset"]), dtype=torch.float32, device=absmax.device)
        nested_absmax = nested_absmax.float()
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: other dtypes are views of the bytes
        packed = packed.contiguous().view(torch.uint8)
    try:
        check_scales(packed, absmax.reshape(-1), nested_absmax, offset, quant_state.get("blocksize"), shape[0] * shape[1])
    except (RuntimeError, ValueError) as e:
        fail(f"inconsistent with its quant-state (shape {shape}, blocksize {quant_state.get('blocksize')}): {e}")
    return NF4Tensor(packed, absmax.reshape(-1), quant_state["blocksize"], shape, dtype, False, nested_absmax, offset)


def read_checkpoint(source: Union[str, os.PathLike, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(os.fspath(source))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{os.fspath(source)}: not a readable safetensors file ({e})") from None


def convert_nf4_entries(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every group of bitsandbytes NF4 entries by one NF4Tensor under its weight key."""
    state_dict = dict(state_dict)
    for quant_key in [k for k in state_dict if k.endswith(".quant_state.bitsandbytes__fp4")]:
        raise CheckpointError(f"{quant_key}: FP4 weights are not supported; nf4compile reads NF4")
    for quant_key in [k for k in state_dict if k.endswith(QUANT_STATE_SUFFIX)]:
        key = quant_key.removesuffix(QUANT_STATE_SUFFIX)
        state_dict[key] = nf4_from_state_dict(state_dict, key)
    return state_dict


def save(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model.state_dict()`` (bitsandbytes layout for NF4 weights) as safetensors.

    Tied tensors are written once, under their first name, as transformers does.
    """
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.detach().contiguous()
    save_file(tensors, os.fspath(path), metadata={"format": "pt", "producer": "nf4compile"})


def load(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, Tensor]],
    *,
    keep_sensitive: bool = True,
) -> nn.Module:
    """Load a checkpoint (a safetensors path or a state dict) into ``model``, in place.

    NF4 weights in bitsandbytes' layout (ours, or written by bitsandbytes/transformers) become
    NF4Tensors without re-quantizing; everything else is loaded as is. The model may be an
    unquantized skeleton, also on the ``meta`` device: tensors are assigned, never copied into the
    skeleton's storage. Sensitive layers (lm_head, output embeddings, tied weights) that arrive in
    NF4 are dequantized back to dense unless ``keep_sensitive=False``.

    Every key and shape is checked before anything is assigned: on error the model is unchanged.
    """
    from nf4compile.policy import is_conv1d, quantizable_layers, sensitive_layers

    state_dict = convert_nf4_entries(read_checkpoint(source))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {
        f"{prefix}{'.' if prefix else ''}{name}": buf
        for prefix, module in model.named_modules()
        for name, buf in module._buffers.items()
        if buf is not None and name not in module._non_persistent_buffers_set
    }
    expected = {**params, **buffers}
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected keys for this model: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
    # A tensor tied to another (same Parameter object) may be stored once, as transformers does.
    present_ids = {id(expected[k]) for k in state_dict}
    missing = sorted(k for k in expected if k not in state_dict and id(expected[k]) not in present_ids)
    if missing:
        raise CheckpointError(f"missing keys: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))

    layers = dict(quantizable_layers(model))
    sensitive = sensitive_layers(model) if keep_sensitive else {}
    staged: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        module_name = key.rpartition(".")[0]
        if isinstance(value, NF4Tensor):
            module = layers.get(module_name)
            if module is None or key != (f"{module_name}." if module_name else "") + "weight":
                raise CheckpointError(f"{key}: an NF4 weight, but {module_name or 'the model'} is not a Linear/Conv1D layer")
            if is_conv1d(module):
                value = value.t()
            if module_name in sensitive:
                value = value.dequantize()
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key}: shape {list(value.shape)} in the checkpoint, {list(expected[key].shape)} in the model")
        staged[key] = value

    names_of = {}  # tied names share one tensor: assign one object to all of them
    for name, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(name)
    done = set()
    for key, value in staged.items():
        if id(expected[key]) in done:
            continue
        done.add(id(expected[key]))
        if key in params:
            requires_grad = params[key].requires_grad and not isinstance(value, NF4Tensor)
            value = nn.Parameter(value, requires_grad=requires_grad)
        for name in names_of[id(expected[key])]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if name in params:
                setattr(module, attr, value)
            else:
                module._buffers[attr] = value
            if isinstance(value, NF4Tensor):
                register_state_dict_hooks(module)
    from nf4compile.passes import register_for_model  # the Inductor passes, on first use, never at import

    register_for_model(model, keep_sensitive=keep_sensitive)
    return model
