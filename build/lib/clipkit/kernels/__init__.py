"""Loss kernels with no config, no collectives and no clipkit imports.

`chunked_contrastive` (PyTorch) and `triton_contrastive` (GPU) implement the same block
primitives of the CLIP/SigLIP/distillation losses (plain forward computations; autograd
and collectives live in `clipkit.losses.fused`). `late_interaction` is FILIP's tiled
token-wise similarity as an autograd Function.
"""

from clipkit.kernels.chunked_contrastive import distill_block, infonce_block_grads, infonce_block_stats, sigmoid_block
from clipkit.kernels.late_interaction import filip_similarity

__all__ = ["distill_block", "filip_similarity", "infonce_block_grads", "infonce_block_stats", "sigmoid_block"]
