"""bitsandbytes' state-dict layout for NF4 weights: what we write, and what we accept.

Under ``<module>.weight`` bitsandbytes (``Linear4bit._save_to_state_dict``) stores
``weight`` (packed uint8 [(n+1)//2, 1]), ``weight.absmax``, ``weight.quant_map``, and when
double-quantized ``weight.nested_absmax`` and ``weight.nested_quant_map``, plus
``weight.quant_state.bitsandbytes__nf4``: a uint8 tensor holding JSON with the rest.
transformers' bitsandbytes loader reads exactly these keys, so checkpoints move both ways.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
from typing import Callable, Mapping, Optional, Union

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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# bitsandbytes entries small enough to read while planning a load (the JSON and the code tables).
_SMALL_NF4_SUFFIXES = (QUANT_STATE_SUFFIX, ".quant_map", ".nested_quant_map")


class _SafetensorsFile:
    """A safetensors file read one tensor at a time with plain reads, not a memory map: the pages of
    a mapped file count towards the process's resident memory while the map is open, so reading a
    checkpoint through one costs its whole size."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                header_size = int.from_bytes(f.read(8), "little")
                if size < 8 or 8 + header_size > size:
                    raise ValueError(f"header of {header_size} bytes in a file of {size}")
                header = json.loads(f.read(header_size))
            header.pop("__metadata__", None)
            self.data_start = 8 + header_size
            self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
            for name, info in header.items():
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{name} has dtype {info['dtype']}, which nf4compile does not read")
                shape, (begin, end) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - self.data_start:
                    raise ValueError(f"{name} ({list(shape)}, {info['dtype']}) lies outside the file (truncated?)")
                self.entries[name] = (dtype, shape, begin)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None

    def read(self, name: str) -> Tensor:
        dtype, shape, begin = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                    raise CheckpointError(f"{self.path}: {name} ends past the end of the file (truncated?)")
        return tensor


class Checkpoint:
    """The tensors of a checkpoint by name, each read only when asked for: a state dict, a
    safetensors file, or a folder (``model.safetensors`` or the shards of its index JSON); a
    torch.distributed.checkpoint folder (a sharded save) is read whole, on the CPU."""

    def __init__(self, source: Union[str, os.PathLike, Mapping[str, Tensor]]):
        self._tensors: Mapping[str, Tensor] = {}
        self._files: dict[str, _SafetensorsFile] = {}
        if not isinstance(source, Mapping) and os.path.isfile(os.path.join(os.fspath(source), ".metadata")):
            from nf4compile.distributed import read_dcp_checkpoint

            source = read_dcp_checkpoint(source)
        if isinstance(source, Mapping):
            for name, value in source.items():
                if not isinstance(value, Tensor):
                    raise CheckpointError(f"{name}: a {type(value).__name__}, not a tensor")
            self._tensors = source
            self.names = list(source)
            self._known = set(self.names)
            return
        path = os.fspath(source)
        if os.path.isdir(path):
            single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
            if not (os.path.isfile(single) or os.path.isfile(index)):
                raise CheckpointError(f"{path}: no model.safetensors (nor a sharded model.safetensors.index.json)")
            path = single if os.path.isfile(single) else index
        if path.endswith(".json"):
            try:
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors index ({e})") from None
            shards = {shard: _SafetensorsFile(os.path.join(os.path.dirname(path), shard)) for shard in sorted(set(weight_map.values()))}
            for name, shard in weight_map.items():
                if name not in shards[shard].entries:
                    raise CheckpointError(f"{path}: {name} is not in {shard}")
                self._files[name] = shards[shard]
        else:
            file = _SafetensorsFile(path)
            self._files = dict.fromkeys(file.entries, file)
        self.names = list(self._files)
        self._known = set(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def read(self, name: str) -> Tensor:
        return self._tensors[name] if name in self._tensors else self._files[name].read(name)

    def meta(self, name: str) -> Tensor:
        """A meta tensor of the entry's shape and dtype: plans a load without reading data."""
        if name in self._tensors:
            return self._tensors[name].to("meta")
        dtype, shape, _ = self._files[name].entries[name]
        return torch.empty(shape, dtype=dtype, device="meta")


def read_checkpoint(source: Union[str, os.PathLike, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Every tensor of a checkpoint (see ``Checkpoint``), in memory."""
    checkpoint = Checkpoint(source)
    return {name: checkpoint.read(name) for name in checkpoint.names}


def convert_nf4_entries(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every group of bitsandbytes NF4 entries by one NF4Tensor under its weight key."""
    state_dict = dict(state_dict)
    _refuse_fp4(state_dict)
    for quant_key in [k for k in state_dict if k.endswith(QUANT_STATE_SUFFIX)]:
        key = quant_key.removesuffix(QUANT_STATE_SUFFIX)
        state_dict[key] = nf4_from_state_dict(state_dict, key)
    return state_dict


def _refuse_fp4(names) -> None:
    for quant_key in [k for k in names if k.endswith(".quant_state.bitsandbytes__fp4")]:
        raise CheckpointError(f"{quant_key}: FP4 weights are not supported; nf4compile reads NF4")


def _nf4_group(checkpoint: Checkpoint, key: str, materialize: bool) -> NF4Tensor:
    """The NF4Tensor stored under ``key``, validated; with ``materialize=False`` its large tensors are
    meta tensors of the stored shapes (enough to check the group and learn the weight's shape)."""
    group = {}
    for suffix in ("", *_TENSOR_SUFFIXES, QUANT_STATE_SUFFIX):
        name = key + suffix
        if name in checkpoint:
            group[name] = checkpoint.read(name) if materialize or suffix in _SMALL_NF4_SUFFIXES else checkpoint.meta(name)
    return nf4_from_state_dict(group, key)


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


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; elsewhere there is nothing to call
    except (OSError, AttributeError, TypeError):
        return None


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS between the tensors of a streamed load. glibc keeps the
    freed temporaries of each tensor as holes between the long-lived tensors of the loaded model, so
    the resident memory grew with every layer (measured with bench/stream_memory.py, 160 MB bf16
    checkpoint: peak 119 MB over the start without this, 67 MB with it, for a 48 MB loaded model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, Tensor]],
    *,
    keep_sensitive: bool = True,
    config=None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Load a checkpoint (safetensors file, folder of shards, DCP folder or state dict) into ``model``, in place.

    NF4 weights in bitsandbytes' layout (ours, or written by bitsandbytes/transformers) become
    NF4Tensors without re-quantizing; everything else is loaded as is, or, given ``config`` (an
    ``NF4Config``; ``filter_fn`` as in ``quantize``), the dense weights that ``quantize`` would pick
    are quantized as they are read. The model may be an unquantized skeleton, also on the ``meta``
    device: tensors are assigned, never copied into the skeleton's storage. Sensitive layers
    (lm_head, output embeddings, tied weights) that arrive in NF4 are dequantized back to dense
    unless ``keep_sensitive=False``.

    Streaming: tensors are read one at a time (files with plain reads, no memory map), moved to
    ``device`` and quantized there, so peak memory is about the loaded (NF4) model plus one dense
    tensor: a model larger than memory in bf16 loads into a ``meta`` skeleton.

    Atomic: every key, shape and NF4 group is checked from the headers before any data is read,
    and nothing is assigned before every tensor is ready. On any error the tensors read so far are
    dropped and the model is exactly as it was.
    """
    from nf4compile.policy import is_conv1d, quantizable_layers, sensitive_layers
    from nf4compile.quantize import NF4Config, skip_reason
    from nf4compile.tensor import check_quantizable, to_nf4

    if config is not None and not isinstance(config, NF4Config):
        raise TypeError(f"config must be an nf4compile.NF4Config, got {type(config).__name__}")
    if config is not None and config.calibrated:
        raise ValueError("load(config=...) quantizes one tensor at a time; calibrated NF4 needs the whole model: use nf4compile.quantize")
    checkpoint = Checkpoint(source)
    _refuse_fp4(checkpoint.names)
    layers = dict(quantizable_layers(model))

    # 1. Plan from the headers: what each entry becomes, every error raised before any data is read.
    nf4_keys = {name.removesuffix(QUANT_STATE_SUFFIX): None for name in checkpoint.names if name.endswith(QUANT_STATE_SUFFIX)}
    planned: dict[str, Tensor] = {key: _nf4_group(checkpoint, key, materialize=False) for key in nf4_keys}
    nf4_parts = {key + suffix for key in nf4_keys for suffix in (*_TENSOR_SUFFIXES, QUANT_STATE_SUFFIX)}
    for name in checkpoint.names:
        if name not in planned and name not in nf4_parts:
            planned[name] = checkpoint.meta(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = {
        f"{prefix}{'.' if prefix else ''}{name}": buf
        for prefix, module in model.named_modules()
        for name, buf in module._buffers.items()
        if buf is not None and name not in module._non_persistent_buffers_set
    }
    expected = {**params, **buffers}
    unexpected = sorted(set(planned) - set(expected))
    if unexpected:
        raise CheckpointError(f"unexpected keys for this model: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
    # A tensor tied to another (same Parameter object) may be stored once, as transformers does.
    present_ids = {id(expected[k]) for k in planned}
    missing = sorted(k for k in expected if k not in planned and id(expected[k]) not in present_ids)
    if missing:
        raise CheckpointError(f"missing keys: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))

    sensitive = sensitive_layers(model) if keep_sensitive else {}
    quantize_sensitive = sensitive_layers(model)  # config.keep_sensitive decides, as in quantize
    skipped: dict[str, str] = {}
    to_quantize: set[str] = set()
    for key, value in planned.items():
        module_name = key.rpartition(".")[0]
        module = layers.get(module_name)
        is_weight = module is not None and key == (f"{module_name}." if module_name else "") + "weight"
        if isinstance(value, NF4Tensor):
            if not is_weight:
                raise CheckpointError(f"{key}: an NF4 weight, but {module_name or 'the model'} is not a Linear/Conv1D layer")
            shape = value.shape if not is_conv1d(module) else value.t().shape
        else:
            shape = value.shape
            if config is not None and is_weight:
                reason = skip_reason(module_name, module, config, quantize_sensitive, filter_fn)
                if reason is None:
                    to_quantize.add(key)
                else:
                    skipped[module_name] = reason
        if tuple(shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key}: shape {list(shape)} in the checkpoint, {list(expected[key].shape)} in the model")

    # 2. Read, move, quantize: one tensor at a time.
    staged: dict[str, Tensor] = {}
    try:
        for key in planned:
            _release_freed_memory()
            module = layers.get(key.rpartition(".")[0])
            value = _nf4_group(checkpoint, key, materialize=True) if key in nf4_keys else checkpoint.read(key)
            if device is not None:
                value = value.to(device)
            if isinstance(value, NF4Tensor):
                if is_conv1d(module):
                    value = value.t()
                if key.rpartition(".")[0] in sensitive:
                    value = value.dequantize()
            elif key in to_quantize:
                check_quantizable(value, key)
                conv1d = is_conv1d(module)  # Conv1D holds [in, out]; NF4 data is [out, in] as in bitsandbytes
                nf4 = to_nf4(value.t() if conv1d else value, config.block_size, config.double_quant)
                value = nf4.t() if conv1d else nf4
            staged[key] = value
    except BaseException:
        staged.clear()  # a traceback keeps this frame alive: drop the tensors read so far now
        raise

    # 3. Assign: nothing below can fail.
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

    if config is not None:
        model._nf4compile_skipped = {**getattr(model, "_nf4compile_skipped", {}), **skipped}
        model._nf4compile_config = config
        register_for_model(model, fuse=config.fuse, keep_sensitive=config.keep_sensitive and keep_sensitive)
    else:
        register_for_model(model, keep_sensitive=keep_sensitive)
    return model
