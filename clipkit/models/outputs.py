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
from open_clip.transformer import text_global_pool
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


def _text_positions(model: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """[b, L] token ids -> [b, L, w] per-position outputs of a CLIP text tower (after `ln_final`,
    not projected), as in open_clip's `CLIP.encode_text`. L may be shorter than the context:
    the positional embedding and the causal mask are cut to it."""
    length = text.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))


def project_text(projection: nn.Module | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """[..., w] -> [..., D] by a text projection (a Linear or a matrix); None leaves x as it is."""
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _project_text(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[..., w] -> [..., D] by the text tower's own projection, if it has one."""
    return project_text(model.text_projection, x)


def text_token_features(model: nn.Module, text: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, L] token ids -> ([b, L, D] per-position features in the joint width, [b, L] bool
    mask of real tokens). Mirrors open_clip's `CLIP.encode_text` minus the pooling."""
    return _project_text(model, _text_positions(model, text)), text != pad_id


def trimmable_text_length(model: nn.Module, text: torch.Tensor, pad_id: int = 0, multiple: int = 1) -> int | None:
    """The leading positions of `text` [b, L] that decide a causal CLIP text tower's pooled output,
    or None when trimming would not be exact (or would not shorten anything).

    In open_clip's `CLIP.encode_text` the attention mask is causal, so position i sees only
    positions <= i, and the pooled feature is read at the EOT token (`argmax` pooling, or
    `eos` with an EOS id that is not the pad id). Every position after the batch's last real
    token is then a pad that nothing read depends on: dropping those positions changes no
    output. Captions are short (CLIP's 77-position context; web alt-text averages well under
    half of it), so most of the text tower's work is on such pads. `text` may be shorter than the
    context (L <= C): its L positions are the context's first L. `multiple` rounds the length
    up (fewer distinct shapes, e.g. for kernel autotuning); eager PyTorch needs none.
    """
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask", "text_pool_type")
    if not all(getattr(model, name, None) is not None for name in needed):
        return None   # not a CLIP text tower (CustomTextCLIP, SigLIP's TextTransformer, ...)
    pool, eos = model.text_pool_type, getattr(model, "text_eos_id", None)
    if not (pool == "argmax" or (pool == "eos" and eos is not None and eos != pad_id)):
        return None
    mask = model.attn_mask
    context, full = mask.shape[0], text.shape[1]
    if full > context or mask.shape != (context, context) \
            or not torch.equal(torch.isneginf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)):
        return None   # not the causal mask this argument rests on
    real = (text != pad_id).any(dim=0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    length = min(full, -(-length // multiple) * multiple)
    # Texts tokenized shorter than the context (a role at 77 positions on a 248-position tower)
    # run on the first `full` positions too, exact for the same reason; `encode_text` would not
    # take them at all.
    return length if length < context else None


def encode_text_pooled(model: nn.Module, text: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[b, L] token ids -> [b, D] pooled, projected text features: open_clip's `encode_text`,
    run on the first `trimmable_text_length` positions when that is exact (else unchanged)."""
    length = trimmable_text_length(model, text, pad_id)
    if length is None:
        return model.encode_text(text)
    text = text[:, :length]
    pooled = text_global_pool(_text_positions(model, text), text, model.text_pool_type,
                              eos_token_id=getattr(model, "text_eos_id", None))
    return _project_text(model, pooled)


def text_pooled_unprojected(model: nn.Module, text: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[b, L] token ids -> [b, w] pooled text features of a CLIP text tower before any projection
    (so that several heads' projections share one tower pass), trimmed as `encode_text_pooled`."""
    length = trimmable_text_length(model, text, pad_id)
    if length is not None:
        text = text[:, :length]
    return text_global_pool(_text_positions(model, text), text, model.text_pool_type,
                            eos_token_id=getattr(model, "text_eos_id", None))
