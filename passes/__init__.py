"""FX graph passes (imported as ``nf4compile.passes``).

- ``FuseDequantMatmul``: ``nf4compile.dequantize -> views -> mm/addmm/bmm/linear/matmul`` becomes one
  ``nf4compile.linear``.
- ``GroupSiblingLinears``: ``nf4compile.linear`` calls on one decode input of at most 16 rows (q, k, v;
  gate, up) become one ``nf4compile.linear_group`` (one kernel launch), inside Inductor.
- ``KeepSensitiveBF16``: sensitive layers never compute from NF4 (dense constants in exported programs,
  left unfused with a warning inside torch.compile).
- ``RecomputeDequantize``: training graphs recompute ``dequantize`` in the backward instead of saving the
  dense weight (Inductor's joint-graph hook, ``NF4JointPassManager``).
- ``NF4PassManager`` runs KeepSensitiveBF16, FuseDequantMatmul and GroupSiblingLinears in Inductor's
  post-grad hook (``register_inductor_passes``, done by ``quantize()``/``load()``); ``apply`` runs the first
  two on an exported program.
"""

from nf4compile.passes.backend import nf4compile_backend
from nf4compile.passes.fuse_dequant_matmul import FuseDequantMatmul
from nf4compile.passes.group_sibling_linears import GroupSiblingLinears
from nf4compile.passes.keep_sensitive_bf16 import KeepSensitiveBF16
from nf4compile.passes.manager import (
    NF4JointPassManager, NF4PassManager, PassOptions, apply, register_for_model, register_inductor_passes,
)
from nf4compile.passes.names import module_name
from nf4compile.passes.recompute_dequantize import RecomputeDequantize

__all__ = [
    "FuseDequantMatmul",
    "GroupSiblingLinears",
    "KeepSensitiveBF16",
    "NF4JointPassManager",
    "NF4PassManager",
    "PassOptions",
    "RecomputeDequantize",
    "apply",
    "module_name",
    "nf4compile_backend",
    "register_for_model",
    "register_inductor_passes",
]
