"""Model folders that transformers loads as bitsandbytes NF4 (``from_pretrained(out_dir)``).

A folder is ``config.json`` with a ``quantization_config`` (transformers' ``BitsAndBytesConfig``)
plus ``model.safetensors`` in bitsandbytes' state-dict layout (``nf4compile.save``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from nf4compile.policy import quantizable_layers
from nf4compile.quantize import NF4Config, quantize
from nf4compile.serialization import save
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
