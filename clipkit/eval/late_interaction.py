"""Zero-shot classification, retrieval and selection scored by FILIP's token-wise late interaction.

Used instead of the pooled-embedding FAISS path when the run's loss is `loss=filip`: FILIP
trains token features, not the pooled ones. Scores are dense [queries, gallery] matrices
built block by block with the loss's own (tiled) similarity, so memory is O(N·N_tokens·D)
for the token features plus one score matrix: sets up to ~10^5 items, not FAISS scale.
Metric names and the pessimistic tie rule are those of `clipkit.eval.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from clipkit.errors import ClipkitConfigError
from clipkit.eval.metrics import TIE_ATOL, classification_metrics, rank_metrics, selection_groups, selection_metrics

# (a_tokens [n_a, N_a, D], a_mask | None, b_tokens [n_b, N_b, D], b_mask | None) -> [n_a, n_b]
Similarity = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None], torch.Tensor]


@torch.no_grad()
def blockwise_scores(sim: Similarity, a: torch.Tensor, a_mask: torch.Tensor | None, b: torch.Tensor,
                     b_mask: torch.Tensor | None, block: int = 1024) -> torch.Tensor:
    """[n_a, n_b] float32 late-interaction scores, `block` a-rows at a time."""
    rows = [sim(a[i:i + block], None if a_mask is None else a_mask[i:i + block], b, b_mask).float()
            for i in range(0, len(a), block)]
    return torch.cat(rows) if rows else torch.empty(0, len(b))


@torch.no_grad()
def zeroshot_scores(sim: Similarity, image_tokens: torch.Tensor, class_tokens: torch.Tensor,
                    class_mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, C]: each class's image→text score averaged over its templates.

    Args:
        image_tokens: [N, N_img, D]. class_tokens: [C·T, L, D], class-major (class c's T
            templates are rows c·T .. c·T + T − 1). class_mask: [C·T, L] bool.
    """
    scores = blockwise_scores(sim, image_tokens, None, class_tokens, class_mask)
    return scores.reshape(len(image_tokens), num_classes, -1).mean(dim=2)


@torch.no_grad()
def own_image_scores(sim: Similarity, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                     text_mask: torch.Tensor, text_image_index: torch.Tensor, block: int = 256) -> torch.Tensor:
    """[M] float32: each text's late-interaction score against its own image only.

    Args:
        image_tokens: [N, N_img, D]. text_tokens: [M, L, D], text_mask [M, L] bool.
        text_image_index: [M], non-decreasing (each image's texts together, as a selection set
            lists them), so a block of images owns one contiguous run of texts.
    """
    owners = text_image_index.long()
    out = torch.empty(len(owners))
    for start in range(0, len(image_tokens), block):
        lo, hi = (int(i) for i in torch.searchsorted(owners, torch.tensor([start, start + block])))
        if hi > lo:
            scores = sim(image_tokens[start:start + block], None, text_tokens[lo:hi], text_mask[lo:hi]).float()
            out[lo:hi] = scores[owners[lo:hi] - start, torch.arange(hi - lo)]
    return out


def ranks_from_scores(scores: np.ndarray, pair_query: np.ndarray, pair_gallery: np.ndarray,
                      *, tie_atol: float = TIE_ATOL) -> np.ndarray:
    """Pessimistic rank (see `clipkit.eval.metrics`) of each query's best correct item.

    Args:
        scores: [Q, G]. pair_query, pair_gallery: [P], the correct (query, item) pairs.
    Returns: [Q] int64, 1-based; queries without a correct item get 0.
    """
    correct = np.zeros(scores.shape, dtype=bool)
    correct[pair_query, pair_gallery] = True
    best = np.where(correct, scores, -np.inf).max(axis=1)
    ahead = ((scores >= (best - tie_atol)[:, None]) & ~correct).sum(axis=1)
    return np.where(np.isneginf(best), 0, ahead + 1).astype(np.int64)


def late_interaction_metrics(sim: Similarity, *, image_tokens: torch.Tensor, tasks: Sequence[str],
                             labels: torch.Tensor | None = None, class_tokens: torch.Tensor | None = None,
                             class_mask: torch.Tensor | None = None, num_classes: int = 0,
                             text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                             text_image_index: torch.Tensor | None = None,
                             recall_k: Sequence[int] = (1, 5, 10),
                             tie_atol: float = TIE_ATOL) -> dict[str, dict[str, float]]:
    """{task: metrics} for "zeroshot_classification", "retrieval" and "selection" (CLIP_benchmark names).

    Args:
        image_tokens: [N, N_img, D]. labels: [N] int. class_tokens/class_mask: the
            class-major template captions (see `zeroshot_scores`), `num_classes` classes.
        text_tokens: [M, L, D], text_mask [M, L], text_image_index [M]: the captions; for
            "selection" each image's true caption then its negatives (retrieval then ranks the
            true captions only).
        tie_atol: wrong items scoring within this of the correct one count as ahead (`eval.tie_tolerance`).
    """
    results: dict[str, dict[str, float]] = {}
    if "zeroshot_classification" in tasks:
        scores = zeroshot_scores(sim, image_tokens, class_tokens, class_mask, num_classes)
        labels = labels.numpy().astype(np.int64)
        ranks = ranks_from_scores(scores.numpy(), np.arange(len(labels)), labels, tie_atol=tie_atol)
        results["zeroshot_classification"] = classification_metrics(ranks, labels, num_classes)
    if "selection" in tasks:
        owners = text_image_index.numpy().astype(np.int64)
        try:
            is_true, _ = selection_groups(owners, len(image_tokens))
        except ValueError as err:
            raise ClipkitConfigError(f"selection: {err}") from None
        scores = own_image_scores(sim, image_tokens, text_tokens, text_mask, text_image_index).numpy()
        results["selection"] = selection_metrics(scores, owners, len(image_tokens), tie_atol=tie_atol)
        keep = torch.from_numpy(is_true)
        text_tokens, text_mask, text_image_index = text_tokens[keep], text_mask[keep], text_image_index[keep]
    if "retrieval" in tasks:
        owners = text_image_index.numpy().astype(np.int64)
        captions = np.arange(len(owners))
        t2i = blockwise_scores(sim, text_tokens, text_mask, image_tokens, None).numpy()
        i2t = blockwise_scores(sim, image_tokens, None, text_tokens, text_mask).numpy()
        image_ranks = ranks_from_scores(t2i, captions, owners, tie_atol=tie_atol)
        text_ranks = ranks_from_scores(i2t, owners, captions, tie_atol=tie_atol)
        has_caption = np.bincount(owners, minlength=len(image_tokens)) > 0
        results["retrieval"] = {**rank_metrics(image_ranks, "image_retrieval", recall_k),
                                **rank_metrics(text_ranks[has_caption], "text_retrieval", recall_k)}
    return results
