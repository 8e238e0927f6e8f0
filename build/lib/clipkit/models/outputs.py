"""What a loss can ask of an open_clip model: pooled features, token features with masks,
caption logits. No loss and no collectives here.

Token features follow FILIP (Yao et al. 2021): every output token projected to the joint
width by the tower's own projection (`visual.proj`, `text_projection`). Image tokens are
the patch tokens without CLS; text tokens are every position, with `tokens != pad_id` as
the mask. The vision path calls open_clip's `VisionTransformer._embeds / transformer /
_pool` (open_clip >= 3.0) so that TailDrop can act between the transformer and the pooler.
"""

from __future__ import annotations

import torch
from torch import nn


def is_vision_transformer(visual: nn.Module) -> bool:
    return all(hasattr(visual, name) for name in ("_embeds", "transformer", "_pool"))


def is_coca(model: nn.Module) -> bool:
    return hasattr(model, "text_decoder")


def tail_drop(x: torch.Tensor, k: int) -> torch.Tensor:
    """TailDrop (Visual Lexicon): [b, 1 + N, w] transformer outputs -> [b, 1 + N − k, w],
    the last k patch tokens removed (CLS at position 0 always kept); k = 0 is the identity."""
    if k <= 0:
        return x
    if k >= x.shape[1] - 1:
        raise ValueError(f"cannot drop {k} of {x.shape[1] - 1} patch tokens")
    return x[:, : x.shape[1] - k]


def encode_image_parts(visual: nn.Module, images: torch.Tensor, drop_last: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A ViT's pooled embedding [b, D] (projected) and its tokens [b, N, w] (as the pooler
    returns them: unprojected patch tokens, or CoCa's attention-pooled queries), with the
    last `drop_last` patch tokens removed before the pooler."""
    x = visual.transformer(visual._embeds(images))
    pooled, tokens = visual._pool(tail_drop(x, drop_last))
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens


def image_token_features(visual: nn.Module, images: torch.Tensor, drop_last: int = 0) -> torch.Tensor:
    """[b, 3, H, W] -> [b, N, D] patch-token features projected to the joint width D."""
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("token features need a ViT without an attentional pooler")
    _, tokens = encode_image_parts(visual, images, drop_last)
    return tokens @ visual.proj if visual.proj is not None else tokens


def text_token_features(model: nn.Module, text: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, L] token ids -> ([b, L, D] per-position features in the joint width, [b, L] bool
    mask of real tokens). Mirrors open_clip's `CLIP.encode_text` minus the pooling."""
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
    return x, text != pad_id
