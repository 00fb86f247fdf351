"""Model folders that transformers loads as bitsandbytes NF4 (``from_pretrained(out_dir)``).

A folder is ``config.json`` with a ``quantization_config`` (transformers' ``BitsAndBytesConfig``)
plus ``model.safetensors`` in bitsandbytes' state-dict layout (``nf4compile.save``).
``from_pretrained(folder)`` reads such a folder back (ours, or one transformers + bitsandbytes wrote).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from nf4compile.policy import quantizable_layers
from nf4compile.quantize import NF4Config, quantize
from nf4compile.serialization import load, save
from nf4compile.tensor import NF4Tensor

PathLike = Union[str, os.PathLike]


def save_pretrained(model: nn.Module, out_dir: PathLike) -> Path:
    """Write a quantized transformers model as a folder that ``AutoModel.from_pretrained`` loads
    through bitsandbytes, reproducing exactly which layers are NF4 and which stay dense."""
    from transformers import BitsAndBytesConfig

    if not hasattr(getattr(model, "config", None), "save_pretrained"):
        raise TypeError("save_pretrained needs a transformers model (one with a .config); use nf4compile.save for others")
    layers = dict(quantizable_layers(model))
    nf4 = [m.weight for m in layers.values() if isinstance(m.weight, NF4Tensor)]
    if not nf4:
        raise ValueError("the model has no NF4 weights: call nf4compile.quantize(model) first")
    # transformers has one compute dtype and one double-quant flag per model.
    for what, values in (("dtypes", {w.dtype for w in nf4}), ("double-quant settings", {w.double_quant for w in nf4})):
        if len(values) > 1:
            raise ValueError(f"the NF4 weights have mixed {what} {sorted(map(str, values))}; transformers' config holds one")
    # A skip list replaces transformers' defaults, so it must name lm_head itself; every layer kept
    # dense is listed by its full name so that reloading keeps it dense.
    dense = [name for name, m in layers.items() if not isinstance(m.weight, NF4Tensor)]
    config = copy.deepcopy(model.config)
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=nf4[0].double_quant,
        bnb_4bit_compute_dtype=nf4[0].dtype,
        llm_int8_skip_modules=sorted(set(dense) | {"lm_head"}),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save(model, out / "model.safetensors")
    return out


@contextlib.contextmanager
def _parameters_on_meta():
    """Construct modules with their parameters on the meta device and their buffers real.

    A checkpoint supplies every parameter; non-persistent buffers (rotary ``inv_freq``, position ids) are
    computed at construction and never saved, so they must not land on meta (as ``torch.device("meta")``
    would put them). The CPU parameter is allocated (untouched pages, no cost) and moved at once.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def from_pretrained(
    model_dir: PathLike, *, device=None, keep_sensitive: bool = True, config: Optional[NF4Config] = None
) -> nn.Module:
    """Load a local transformers/bitsandbytes 4-bit folder (``config.json`` with a ``quantization_config``
    of ``load_in_4bit``, nf4, with or without double quant, + ``model.safetensors`` or shards) as an
    nf4compile model; or, given ``config`` (an ``NF4Config``), a dense folder, quantized while it loads.

    The model is built from the config with its parameters on the meta device (no memory, no init), then
    ``nf4compile.load`` streams the checkpoint into it one tensor at a time, straight to ``device``: NF4
    weights become NF4Tensors bit for bit (no re-quantizing), dense Linear weights are quantized as read
    when ``config`` is given, the rest is taken as stored. Peak memory is about the NF4 model plus one
    dense tensor. Local folders only; no hub access.
    """
    import transformers

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"{model_dir}: not a directory (nf4compile.from_pretrained reads local folders only)")
    model_config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    quant = getattr(model_config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant or {})
    if config is not None:
        if quant:
            raise ValueError(f"{folder}: already quantized ({quant.get('quant_method')}); load it without config=")
    elif not (quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit")):
        raise ValueError(
            f"{folder}: config.json has no bitsandbytes load_in_4bit quantization_config ({quant or 'none'}); "
            "pass config=NF4Config() to quantize a dense folder while loading it"
        )
    elif quant.get("bnb_4bit_quant_type") != "nf4":
        raise ValueError(f"{folder}: bnb_4bit_quant_type is {quant.get('bnb_4bit_quant_type')!r}; nf4compile reads NF4 only")
    architecture = (getattr(model_config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    with _parameters_on_meta():
        if model_class is not None:
            model = model_class(model_config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(model_config)
    load(model, folder, keep_sensitive=keep_sensitive, config=config, device=device)
    # The non-persistent buffers (rotary inv_freq) were built on the CPU; everything else is in place.
    return model.to(device).eval() if device is not None else model.eval()


def quantize_directory(
    model_dir: PathLike, out_dir: PathLike, config: NF4Config, calibration_text: Optional[PathLike] = None
) -> nn.Module:
    """``nf4compile quantize``: load a local transformers folder, quantize, write ``out_dir``.

    ``calibration_text``: a text file, one calibration sample per non-empty line, tokenized with the
    folder's own tokenizer. The tokenizer (if the folder has one) is copied to ``out_dir``.
    """
    import transformers

    if not Path(model_dir).is_dir():
        raise ValueError(f"{model_dir}: not a directory (nf4compile quantize reads local model folders only)")
    model_config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architecture = (getattr(model_config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model = (model_class or transformers.AutoModel).from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        if calibration_text is not None:
            raise ValueError(f"{model_dir}: --calibrate needs the folder's tokenizer, which does not load") from None
    batches = None
    if calibration_text is not None:
        lines = [line.strip() for line in Path(calibration_text).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{calibration_text}: no calibration text (one sample per non-empty line)")
        # One sample per batch: no padding, so every token seen is real text.
        batches = [dict(tokenizer(line, return_tensors="pt", truncation=True, max_length=512)) for line in lines]
    quantize(model, config, calibration=batches)
    save_pretrained(model, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model
