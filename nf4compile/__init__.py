"""nf4compile: 4-bit NF4 weights as first-class citizens of torch.compile and torch.export.

    model = nf4compile.quantize(model)      # Linear weights become NF4Tensors (bitsandbytes format)
    model = torch.compile(model)            # fused dequant+matmul kernels
    # or: ep = nf4compile.export(model, (x,))   an ExportedProgram with the fused nf4compile.linear op
    # QLoRA: peft.get_peft_model(model, LoraConfig(...)) trains adapters on the NF4 layers;
    # nf4compile.merge_and_unload(peft_model, requantize=...) merges them (bf16 or NF4)
"""

from nf4compile import ops  # noqa: F401  registers torch.ops.nf4compile.*
from nf4compile import sharding  # noqa: F401  registers the NF4Tensor ops of FSDP2 and DTensor
from nf4compile.export import export, parameter_names
from nf4compile.calibrate import random_tokens
from nf4compile.format import NF4_CODEBOOK
from nf4compile.pretrained import from_pretrained, save_pretrained
from nf4compile.qlora import MergeReport, merge_and_unload
from nf4compile.quantize import NF4Config, dequantize_model, quantize, summary
from nf4compile.report import Report, report
from nf4compile.serialization import CheckpointError, load, save
from nf4compile.tensor import NF4Tensor, to_nf4

__all__ = [
    "NF4_CODEBOOK",
    "CheckpointError",
    "MergeReport",
    "NF4Config",
    "NF4Tensor",
    "Report",
    "dequantize_model",
    "export",
    "from_pretrained",
    "load",
    "merge_and_unload",
    "parameter_names",
    "quantize",
    "random_tokens",
    "report",
    "save",
    "save_pretrained",
    "summary",
    "to_nf4",
]
