"""Fused, memory-bounded loss kernels: autograd Functions with the signatures of `clipkit.losses.functional`.

No config and no clipkit imports here; `clipkit.losses` picks an implementation by `impl=`.
"""

from clipkit.kernels.chunked_contrastive import chunked_clip_loss, chunked_siglip_loss

__all__ = ["chunked_clip_loss", "chunked_siglip_loss"]
