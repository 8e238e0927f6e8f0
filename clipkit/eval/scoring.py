"""How an eval scores an (image, text) pair, chosen once when the eval is built (`eval.scoring`).

    pooled            cosine of the pooled, L2-normalized embeddings (CLIP, SigLIP, CoCa, ...);
                      FAISS search, scales to millions of items.
    late_interaction  FILIP's token-wise score: each token's best match, averaged
                      (`clipkit.kernels.filip_similarity`, tiled); dense score matrices, ~10^5 items.
    auto              late_interaction when the run's loss trains token features (its `needs`
                      include image_tokens, i.e. loss=filip), pooled otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipkit.errors import ClipkitConfigError

SCORINGS = ("auto", "pooled", "late_interaction")


@dataclass(frozen=True)
class PooledCosine:
    """Scores pooled embeddings by inner product (they are unit-norm)."""

    name: str = "pooled"


@dataclass(frozen=True)
class LateInteraction:
    """FILIP late interaction; `block_elems` bounds the tiles of the token-pair products."""

    block_elems: int = 4_194_304
    name: str = "late_interaction"

    def similarity(self, a: torch.Tensor, a_mask: torch.Tensor | None, b: torch.Tensor,
                   b_mask: torch.Tensor | None) -> torch.Tensor:
        """[n_a, N_a, D] × [n_b, N_b, D] (masks [n, N] bool or None) -> [n_a, n_b] scores."""
        from clipkit.kernels import filip_similarity

        return filip_similarity(a, a_mask, b, b_mask, self.block_elems)


Scorer = PooledCosine | LateInteraction


def build_scorer(scoring: str, loss_needs: tuple[str, ...] = ()) -> Scorer:
    """`eval.scoring` (auto | pooled | late_interaction) and the run loss's `needs` -> the scorer."""
    if scoring not in SCORINGS:
        raise ClipkitConfigError(f"eval.scoring={scoring!r} is not one of {', '.join(SCORINGS)}")
    if scoring == "auto":
        scoring = "late_interaction" if "image_tokens" in loss_needs else "pooled"
    return LateInteraction() if scoring == "late_interaction" else PooledCosine()
