"""FILIP's late-interaction eval: with one token per side it is the pooled (FAISS) eval."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clipkit.eval.late_interaction import late_interaction_metrics, ranks_from_scores
from clipkit.eval.metrics import classification_metrics, positive_ranks, retrieval_metrics_exact
from clipkit.kernels import filip_similarity
from clipkit.losses.functional import filip_similarity as naive_similarity


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_one_token_per_side_matches_the_pooled_metrics():
    images, captions = unit(12, 16, seed=0), unit(20, 16, seed=1)
    owners = torch.randint(0, 12, (20,), generator=torch.Generator().manual_seed(2))
    classes = unit(6 * 2, 16, seed=3)  # 6 classes x 2 templates, class-major
    labels = torch.randint(0, 6, (12,), generator=torch.Generator().manual_seed(4))
    got = late_interaction_metrics(
        lambda a, am, b, bm: filip_similarity(a, am, b, bm, 64), image_tokens=images[:, None],
        tasks=["zeroshot_classification", "retrieval"], labels=labels, class_tokens=classes[:, None],
        class_mask=torch.ones(12, 1, dtype=torch.bool), num_classes=6, text_tokens=captions[:, None],
        text_mask=torch.ones(20, 1, dtype=torch.bool), text_image_index=owners)
    assert got["retrieval"] == retrieval_metrics_exact(captions.numpy(), images.numpy(), owners.numpy())
    class_means = classes.reshape(6, 2, 16).mean(dim=1)  # the pooled classifier: template-averaged scores
    ranks = positive_ranks(images.numpy(), class_means.numpy(), np.arange(12), labels.numpy())
    assert got["zeroshot_classification"] == classification_metrics(ranks, labels.numpy(), 6)


def test_padding_does_not_change_scores_and_ties_count_against_the_query():
    images, text = unit(4, 3, 8, seed=0), unit(5, 6, 8, seed=1)
    mask = torch.arange(6)[None] < torch.tensor([[2], [6], [1], [3], [4]])
    noisy = torch.where(mask[..., None], text, unit(5, 6, 8, seed=9))
    run = dict(image_tokens=images, tasks=["retrieval"], text_mask=mask, text_image_index=torch.tensor([0, 1, 2, 3, 3]))
    a = late_interaction_metrics(naive_similarity, text_tokens=text, **run)
    b = late_interaction_metrics(naive_similarity, text_tokens=noisy, **run)
    assert a == b
    scores = np.array([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    assert ranks_from_scores(scores, np.array([0, 1]), np.array([0, 2])).tolist() == [2, 2]
