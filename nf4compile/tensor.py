"""NF4Tensor: a frozen 4-bit NormalFloat weight that behaves like the dense weight it replaces.

Dispatch contract (the graph passes rely on it): a matmul-like op on an NF4Tensor runs the fused
``nf4compile.linear`` op when executed eagerly; when traced (torch.compile, torch.export: the inner
tensors are fake) it emits ``nf4compile.dequantize`` followed by the original aten op, and the passes
in ``nf4compile.passes`` decide what to fuse. So every fusion decision for compiled and exported
graphs is made in one place.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import return_and_correct_aliasing

from nf4compile import format as nf4_format
from nf4compile.ops import prepare_device

aten = torch.ops.aten

_IMPLEMENTED_OPS: dict[object, Callable] = {}


def implements(aten_ops):
    """Register the handler ``fn(func, args, kwargs)`` of aten ops on NF4Tensor."""

    def decorator(fn):
        for op in aten_ops:
            _IMPLEMENTED_OPS[op] = fn
        return fn

    return decorator


class NF4Tensor(torch.Tensor):
    """A 2-D weight stored as bitsandbytes NF4: packed codes + (optionally double-quantized) scales.

    ``quant_shape`` is the shape of the quantized data, [out, in]; the tensor reports it reversed
    when ``transposed`` (a lazy ``.t()``, also how a transformers ``Conv1D`` weight is held).
    ``dtype`` is the dtype of the original weight, the dtype it dequantizes to and computes in.
    """

    tensor_data_names = ["packed", "absmax"]
    optional_tensor_data_names = ["nested_absmax", "offset"]
    tensor_attribute_names = ["block_size", "quant_shape", "dtype", "transposed"]

    packed: Tensor
    absmax: Tensor
    nested_absmax: Optional[Tensor]
    offset: Optional[Tensor]

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls,
        packed: Tensor,
        absmax: Tensor,
        block_size: int,
        quant_shape: tuple[int, ...],
        dtype: torch.dtype,
        transposed: bool = False,
        nested_absmax: Optional[Tensor] = None,
        offset: Optional[Tensor] = None,
    ):
        quant_shape = torch.Size(quant_shape)
        outer_shape = quant_shape if not transposed else torch.Size(reversed(quant_shape))
        self = torch.Tensor._make_wrapper_subclass(
            cls, outer_shape, dtype=dtype, device=packed.device, requires_grad=False
        )
        self.packed, self.absmax = packed, absmax
        self.nested_absmax, self.offset = nested_absmax, offset
        self.block_size, self.quant_shape, self.transposed = block_size, quant_shape, transposed
        if packed.device.type == "cuda" and not is_fake(packed):
            prepare_device(packed.device)
        return self

    def __init__(self, *args, **kwargs):
        pass

    # --- flatten / unflatten from the declared names (what torch.compile and export need) -------

    def __tensor_flatten__(self):
        names = self.tensor_data_names + [n for n in self.optional_tensor_data_names if getattr(self, n) is not None]
        return names, {name: getattr(self, name) for name in self.tensor_attribute_names}

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, attributes, outer_size, outer_stride):
        return cls(**inner_tensors, **attributes)

    def _with(self, fn: Callable[[Tensor], Tensor] = lambda t: t, **attributes) -> "NF4Tensor":
        """A new NF4Tensor with ``fn`` applied to every inner tensor and ``attributes`` replaced."""
        names, attrs = self.__tensor_flatten__()
        return NF4Tensor(**{n: fn(getattr(self, n)) for n in names}, **{**attrs, **attributes})

    # --- user-facing --------------------------------------------------------------------------

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight (in its own dtype unless ``dtype`` is given), shaped as this tensor."""
        dense = torch.ops.nf4compile.dequantize(
            self.packed, self.absmax, self.nested_absmax, self.offset, self.block_size,
            list(self.quant_shape), dtype or self.dtype,
        )
        return dense.t() if self.transposed else dense

    def _stable_hash_for_caching(self) -> str:
        # What AOTAutograd's cache key needs: the layout, which fixes every inner tensor's metadata.
        return f"NF4Tensor({self.block_size},{tuple(self.quant_shape)},{self.dtype},{self.transposed},{self.double_quant},{self.device.type})"

    def nbytes_quantized(self) -> int:
        names, _ = self.__tensor_flatten__()
        return sum(getattr(self, n).nbytes for n in names)

    # FSDP2 looks these up on the sharded weight: it all-gathers NF4 codes and scales, never a dense weight.

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        from nf4compile import sharding

        return sharding.fsdp_pre_all_gather(self, outer_size)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        from nf4compile import sharding

        return sharding.fsdp_post_all_gather(all_gather_outputs, metadata, param_dtype, out)

    def __repr__(self, *, tensor_contents=None) -> str:
        return (
            f"NF4Tensor(shape={list(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, device={self.device}"
            + (", transposed" if self.transposed else "")
            + ")"
        )

    def __reduce_ex__(self, protocol):
        # Pickle (torch.save, deepcopy, multiprocessing) as constructor arguments: plain tensors and
        # attributes that torch.load(weights_only=True) accepts once the class is allow-listed.
        names, attrs = self.__tensor_flatten__()
        return (_rebuild_nf4, ({n: getattr(self, n) for n in names}, attrs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _IMPLEMENTED_OPS.get(func) or _IMPLEMENTED_OPS.get(func.overloadpacket)
        if handler is None:
            raise NotImplementedError(
                f"nf4compile: {func} is not supported on an NF4Tensor (a frozen 4-bit weight). "
                "Call weight.dequantize() to get a dense tensor, or nf4compile.dequantize_model(model)."
                + (
                    " To merge LoRA adapters into NF4 layers (peft's merge would update the weight in place), "
                    "use nf4compile.merge_and_unload(peft_model)."
                    if func._schema.is_mutable else ""
                )
            )
        return handler(func, args, kwargs)


def _rebuild_nf4(inner: dict, attributes: dict) -> NF4Tensor:
    return NF4Tensor(**inner, **attributes)


torch.serialization.add_safe_globals([NF4Tensor, _rebuild_nf4])


def to_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a 2-D floating-point weight [out, in] to NF4 in bitsandbytes' format."""
    check_quantizable(weight)
    nf4_format.check_block_size(block_size)
    packed, absmax = torch.ops.nf4compile.quantize(weight.detach(), block_size)
    nested_absmax = offset = None
    if double_quant:
        absmax, nested_absmax, offset = nf4_format.double_quantize(absmax)
    return NF4Tensor(packed, absmax, block_size, weight.shape, weight.dtype, False, nested_absmax, offset)


def quantize_like(dense: Tensor, like: NF4Tensor) -> NF4Tensor:
    """``dense`` (shaped as ``like`` presents itself) quantized in ``like``'s format: block size, double
    quantization, layout; computing in ``like``'s dtype."""
    nf4 = to_nf4(dense.t() if like.transposed else dense, like.block_size, like.double_quant)
    return nf4._with(transposed=like.transposed, dtype=like.dtype)


def check_quantizable(weight: Tensor, name: str = "weight") -> None:
    """Raise a clear error for anything NF4 cannot represent faithfully."""
    if isinstance(weight, NF4Tensor):
        raise TypeError(f"{name} is already an NF4Tensor")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} has dtype {weight.dtype}; NF4 quantizes float32, float16 or bfloat16 weights")
    if weight.dim() != 2:
        raise ValueError(f"{name} has shape {list(weight.shape)}; NF4 quantizes 2-D weights [out_features, in_features]")
    if weight.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device and has no values to quantize; load real weights first, "
            "or load an NF4 checkpoint into the meta model with nf4compile.load"
        )
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(weight.shape)}); there is nothing to quantize")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} contains NaN or Inf; NF4 block scales would be meaningless")


# --- aten op table --------------------------------------------------------------------------------


def _is_traced(t: NF4Tensor) -> bool:
    return is_fake(t.packed) or torch.compiler.is_compiling()


def _materialize(arg):
    return arg.dequantize() if isinstance(arg, NF4Tensor) else arg


def _call_dense(func, args, kwargs):
    """The traced form of the contract: dequantize every NF4 argument, then the original op."""
    args = torch.utils._pytree.tree_map(_materialize, args)
    kwargs = torch.utils._pytree.tree_map(_materialize, kwargs)
    return func(*args, **kwargs)


@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    return return_and_correct_aliasing(func, args, kwargs, args[0]._with())


@implements([aten.clone.default])
def _clone(func, args, kwargs):
    return args[0]._with(torch.clone)


@implements([aten._to_copy.default])
def _to_copy(func, args, kwargs):
    """``.to(device)`` moves the data; ``.to(dtype)`` changes the compute dtype, never the codes."""
    (self,) = args
    dtype = kwargs.pop("dtype", None) or self.dtype
    if not dtype.is_floating_point:
        raise TypeError(f"nf4compile: an NF4Tensor can compute in a floating dtype only, not {dtype}")
    device = kwargs.pop("device", None) or self.device
    non_blocking = kwargs.pop("non_blocking", False)
    return self._with(lambda t: t.to(device=device, non_blocking=non_blocking), dtype=dtype)


@implements([aten.copy_.default])
def _copy_(func, args, kwargs):
    """Copy another NF4Tensor's data in place; a dense source is quantized in this tensor's format."""
    dst, src = args[0], args[1]
    if not isinstance(src, NF4Tensor):
        src = quantize_like(src.to(dst.dtype), dst)
    if (src.block_size, src.quant_shape, src.double_quant, src.transposed) != (
        dst.block_size, dst.quant_shape, dst.double_quant, dst.transposed
    ):
        raise ValueError(f"nf4compile: cannot copy {src!r} into {dst!r}: the NF4 layouts differ")
    for name in dst.__tensor_flatten__()[0]:
        getattr(dst, name).copy_(getattr(src, name))
    return dst


@implements([aten.t.default, aten.transpose.int, aten.permute.default])
def _transpose(func, args, kwargs):
    self = args[0]
    if func is aten.permute.default and [d % 2 for d in args[1]] != [1, 0]:
        return return_and_correct_aliasing(func, args, kwargs, self._with())
    return return_and_correct_aliasing(func, args, kwargs, self._with(transposed=not self.transposed))


def _check_activation(x: Tensor, w: NF4Tensor) -> None:
    if x.dtype != w.dtype:
        raise TypeError(
            f"nf4compile: the input is {x.dtype} but the NF4 weight computes in {w.dtype}; cast the "
            f"input, or set the weight's compute dtype with module.to({x.dtype})"
        )
    if x.device != w.device:
        raise ValueError(f"nf4compile: the input is on {x.device} but the NF4 weight is on {w.device}")


def _fused_linear(x: Tensor, w: NF4Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ w (w as this tensor presents itself) + bias, by the fused op."""
    _check_activation(x, w)
    out_features, in_features = w.quant_shape
    # The op folds a bias vector; a broadcast one (addmm's [M, N] input, say) is added afterwards.
    folded = bias if bias is None or bias.dim() == 1 else None
    out = torch.ops.nf4compile.linear(
        x, w.packed, w.absmax, w.nested_absmax, w.offset, w.block_size, out_features, in_features,
        folded, not w.transposed,
    )
    return out if bias is None or folded is not None else out + bias


@implements([aten.mm.default, aten.addmm.default, aten.linear.default, aten.matmul.default])
def _matmul(func, args, kwargs):
    if any(isinstance(a, NF4Tensor) and (_is_traced(a) or a.dim() != 2) for a in args):
        return _call_dense(func, args, kwargs)
    if func is aten.linear.default:
        x, w, bias = (list(args) + [None])[:3]
        if isinstance(w, NF4Tensor) and not isinstance(x, NF4Tensor):
            return _fused_linear(x, w._with(transposed=not w.transposed), bias)
    elif func is aten.addmm.default:
        bias, x, w = args
        if isinstance(w, NF4Tensor) and not isinstance(x, NF4Tensor) and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
            return _fused_linear(x, w, bias)
    else:
        x, w = args
        if isinstance(w, NF4Tensor) and not isinstance(x, NF4Tensor):
            return _fused_linear(x, w, None)
        if isinstance(x, NF4Tensor) and not isinstance(w, NF4Tensor) and x.dim() == 2 and w.dim() == 2:
            # W @ y == (y.T @ W.T).T
            return _fused_linear(w.t(), x._with(transposed=not x.transposed), None).t()
    return _call_dense(func, args, kwargs)


# Ops that reshape or broadcast the weight (e.g. ahead of bmm) give the dense result: right answers
# for any consumer, and the same dequantize -> view chain in traced graphs that the passes match.
# (Views and slices that keep whole NF4 blocks stay NF4: nf4compile.sharding.)
implements(
    [
        aten.bmm.default, aten.mv.default, aten.baddbmm.default, aten.reshape.default, aten.expand.default,
        aten.unsqueeze.default, aten.squeeze.dim, aten.select.int,
    ]
)(_call_dense)
