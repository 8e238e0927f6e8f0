"""Embeds an eval set (each rank its share) and gathers the shares onto every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from clipkit.distributed import gather_variable_rows

if TYPE_CHECKING:  # the reader lives in clipkit.data; eval only needs its batch shape
    from clipkit.data.eval_reader import EvalBatch


@dataclass
class EmbeddedSet:
    """Unit-norm embeddings of an eval set, all tensors on one device.

    image_emb: [N, D] float32, L2-normalized.
    text_emb: [M, D] float32, L2-normalized; every caption of every image, image order.
    text_image_index: [M] long, row of `image_emb` each caption belongs to.
    labels: [N] long, class id per image, -1 where the set has none.
    """

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    text_image_index: torch.Tensor
    labels: torch.Tensor


@dataclass
class TokenEmbeddings:
    """FILIP token features of an eval set (CPU), for late-interaction scoring.

    image_tokens: [N, N_img, D] float32, each token L2-normalized.
    text_tokens: [M, L, D] float32, each token L2-normalized; text_mask: [M, L] bool, True on real tokens.
    text_image_index, labels: as in EmbeddedSet.

    To reuse the pooled path's embedding, gather and cache machinery, each item travels as one
    vector: an image as its flattened [N_img·D] tokens, a caption as its [L·D] tokens followed
    by its [L] 0/1 mask (`pack_images`, `pack_texts`); `unpack` inverts it.
    """

    image_tokens: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    text_image_index: torch.Tensor
    labels: torch.Tensor

    @staticmethod
    def pack_images(tokens: torch.Tensor) -> torch.Tensor:
        """[b, N_img, D] -> [b, N_img·D]."""
        return tokens.flatten(1)

    @staticmethod
    def pack_texts(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[b, L, D], [b, L] bool -> [b, L·D + L]."""
        return torch.cat([tokens.flatten(1), mask.float()], dim=1)

    @classmethod
    def unpack(cls, packed: EmbeddedSet, dim: int) -> TokenEmbeddings:
        """The inverse of the packing, on CPU. The embedding path L2-normalizes each packed row, a
        uniform scale per row, so re-normalizing each token restores it exactly."""
        images, texts = packed.image_emb.cpu(), packed.text_emb.cpu()
        length = texts.shape[1] // (dim + 1)
        text_tokens = texts[:, : length * dim].reshape(len(texts), length, dim)
        return cls(image_tokens=F.normalize(images.reshape(len(images), -1, dim), dim=-1),
                   text_tokens=F.normalize(text_tokens, dim=-1), text_mask=texts[:, length * dim:] > 0,
                   text_image_index=packed.text_image_index.cpu(), labels=packed.labels.cpu())


def embed_eval_set(
    batches: Iterable[EvalBatch],
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
) -> EmbeddedSet:
    """Encodes every image and caption of `batches` under torch.no_grad.

    Args:
        batches: EvalBatch items (images [b, 3, H, W] float32, captions per image,
            labels [b] long, keys).
        encode_image: [b, 3, H, W] -> [b, D]; moves inputs to its device itself and is
            expected to be in eval mode.
        encode_text: n strings -> [n, D]; never called with an empty list.

    Returns:
        The EmbeddedSet on encode_image's output device. A share with no batches gives
        [0, 0] embeddings on CPU; `gather_embedded_set` fills in D and the device.
    """
    images, texts, owners, labels = [], [], [], []
    n_seen = 0
    with torch.no_grad():
        for batch in batches:
            img = F.normalize(encode_image(batch.images).float(), dim=-1)
            images.append(img)
            labels.append(batch.labels.to(img.device, torch.long))
            flat = [cap for caps in batch.captions for cap in caps]
            if flat:
                texts.append(F.normalize(encode_text(flat).float(), dim=-1).to(img.device))
                owners += [n_seen + i for i, caps in enumerate(batch.captions) for _ in caps]
            n_seen += len(img)
    if not images:
        no_rows = torch.empty(0, dtype=torch.long)
        return EmbeddedSet(torch.empty(0, 0), torch.empty(0, 0), no_rows, no_rows.clone())
    image_emb = torch.cat(images)
    text_emb = torch.cat(texts) if texts else image_emb.new_empty(0, image_emb.shape[1])
    index = torch.tensor(owners, dtype=torch.long, device=image_emb.device)
    return EmbeddedSet(image_emb, text_emb, index, torch.cat(labels))


def gather_embedded_set(local: EmbeddedSet, *, device: torch.device | str | None = None) -> EmbeddedSet:
    """Every rank's EmbeddedSet concatenated in rank order; the same result on every rank.

    Args:
        local: this rank's share, from `embed_eval_set` (it may be empty).
        device: where the collectives run and the result lives (cuda under NCCL, cpu
            under gloo); None keeps `local`'s device.

    Returns:
        EmbeddedSet with N = sum of N_r and M = sum of M_r; text_image_index is shifted
        by the image counts of earlier ranks so it indexes the gathered images. With
        one process this is `local` itself (moved to `device`).
    """
    dev = torch.device(device) if device is not None else local.image_emb.device
    n_img, n_txt = len(local.image_emb), len(local.text_emb)
    dim = local.image_emb.shape[1] if n_img else 0
    # [W, 3]: per-rank sizes, so empty ranks learn D and the index can be re-offset.
    sizes = gather_variable_rows(torch.tensor([[n_img, n_txt, dim]], dtype=torch.long, device=dev)).cpu()
    dims = {int(d) for d in sizes[:, 2] if d > 0}
    if len(dims) > 1:
        raise ValueError(f"ranks embedded with different dimensions: {sorted(dims)}")
    dim = dims.pop() if dims else 0

    def rows(x: torch.Tensor, total: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = x.to(dev) if len(x) else torch.empty(0, *shape, dtype=dtype, device=dev)
        # Skipped when every rank is empty (e.g. a set with no captions): nothing to send.
        return gather_variable_rows(x) if total else x

    image_emb = rows(local.image_emb, int(sizes[:, 0].sum()), (dim,), torch.float32)
    labels = rows(local.labels, int(sizes[:, 0].sum()), (), torch.long)
    text_emb = rows(local.text_emb, int(sizes[:, 1].sum()), (dim,), torch.float32)
    index = rows(local.text_image_index, int(sizes[:, 1].sum()), (), torch.long)
    first_image = torch.cumsum(sizes[:, 0], 0) - sizes[:, 0]  # [W] offset of each rank's images
    index = index + torch.repeat_interleave(first_image, sizes[:, 1]).to(dev)
    return EmbeddedSet(image_emb, text_emb, index, labels)
