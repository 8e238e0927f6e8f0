"""Loss kernels: block primitives with one contract, in PyTorch chunks (`chunked_contrastive`)
and in Triton (`triton_contrastive`). No config, no autograd, no collectives and no clipkit
imports here; `clipkit.losses.fused` builds the autograd Functions on top.
"""

from clipkit.kernels.chunked_contrastive import infonce_block_grads, infonce_block_stats, sigmoid_block

__all__ = ["infonce_block_grads", "infonce_block_stats", "sigmoid_block"]
