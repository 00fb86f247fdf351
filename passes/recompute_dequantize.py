"""RecomputeDequantize: training graphs keep only the 4-bit weight between forward and backward.

In a compiled training step the joint graph reads each NF4 weight twice: ``dequantize`` for the forward
matmul and ``dequantize`` again for the input gradient (``grad_out @ W``). AOTAutograd's partitioner merges
the two (CSE) and, since it may not recompute a custom op, saves the dense weight for the backward: the
memory of a bf16 model, which is what QLoRA exists to avoid. Marking every ``dequantize`` "must recompute"
(the tag activation checkpointing uses) makes the partitioner give the backward its own dequantize instead,
fed by the packed codes and scales (graph inputs, alive anyway). FuseDequantMatmul then fuses both sides:
the forward into ``nf4compile.linear(x, ...)``, the backward into ``nf4compile.linear(grad, ..., x_at_w=True)``.

A dequantize that already carries a checkpoint policy (inside ``torch.utils.checkpoint``, or a user's
selective-checkpointing policy that says "save") keeps it. Forward-only graphs have no partition: the tag
does nothing there.
"""

from __future__ import annotations

from torch.fx import Graph
from torch.utils.checkpoint import CheckpointPolicy

from nf4compile.passes.fuse_dequant_matmul import dequantize_nodes

RECOMPUTE = "recompute"  # the node.meta key AOTAutograd's min-cut partitioner reads (partitioners.must_recompute)


class RecomputeDequantize:
    """Joint-graph pass: returns how many dequantize nodes it marked for recomputation in the backward."""

    def __call__(self, graph: Graph) -> int:
        marked = 0
        for dq in dequantize_nodes(graph):
            if RECOMPUTE not in dq.meta:
                dq.meta[RECOMPUTE] = CheckpointPolicy.MUST_RECOMPUTE
                marked += 1
        return marked
