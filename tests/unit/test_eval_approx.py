"""Opt-in approximate indexes: factory strings, recall against exact search, and the runner's report."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clipkit.errors import ClipkitConfigError
from clipkit.eval import EmbeddedSet, SearchConfig, evaluate_embedded
from clipkit.eval.search import (
    approximate_topk,
    build_index,
    factory_string,
    recall_vs_exact,
    set_search_params,
    topk_inner_product,
)
from clipkit.eval.suite import build_search_config


def _clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, dim))
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_factory_strings_scale_with_the_gallery() -> None:
    assert factory_string("flat", 10, 8) == "Flat"
    assert factory_string("ivf_flat", 1_000_000, 512) == "IVF4000,Flat"
    assert factory_string("ivf_flat", 100, 8) == "IVF2,Flat"  # n // 39: enough points per centroid
    assert factory_string("hnsw", 10, 8) == "HNSW32,Flat"
    assert factory_string("ivf_pq", 1_000_000, 512) == "IVF4000,PQ64x8"
    assert factory_string("ivf_pq", 100, 8) == "IVF2,PQ1x6"
    assert factory_string("IVF8,Flat", 100, 8) == "IVF8,Flat"


def test_recall_vs_exact_counts_overlap_not_order() -> None:
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_vs_exact(np.array([[3, 2, 1], [4, 9, -1]]), exact, 3) == pytest.approx(4 / 6)
    assert recall_vs_exact(exact, exact, 2) == 1.0


@pytest.mark.parametrize("index", ["ivf_flat", "hnsw", "ivf_pq"])
def test_approximate_indexes_come_close_to_exact(index: str) -> None:
    gallery, queries = _clustered(3000), _clustered(100, seed=1)
    idx = build_index(gallery, index)
    _, exact = topk_inner_product(queries, gallery, 10, use_gpu=False)
    set_search_params(idx, nprobe=1, ef_search=16)
    narrow = recall_vs_exact(approximate_topk(queries, idx, 10)[1], exact, 10)
    set_search_params(idx, nprobe=8, ef_search=256)
    scores, ids = approximate_topk(queries, idx, 10)
    floor = {"ivf_flat": 0.9, "hnsw": 0.95, "ivf_pq": 0.3}[index]  # PQ compresses 16 floats to 2 bytes
    assert recall_vs_exact(ids, exact, 10) >= max(floor, narrow)  # a wider search finds at least as much
    assert scores.shape == ids.shape == (100, 10) and np.all(np.diff(scores, axis=1) <= 1e-6)


def test_nprobe_reaches_every_list_equals_exact() -> None:
    gallery, queries = _clustered(2000), _clustered(50, seed=2)
    idx = build_index(gallery, "IVF16,Flat")
    set_search_params(idx, nprobe=16, ef_search=1)
    _, ids = approximate_topk(queries, idx, 5)
    np.testing.assert_array_equal(ids, topk_inner_product(queries, gallery, 5, use_gpu=False)[1])


def test_runner_reports_approximate_retrieval_with_its_recall_vs_exact() -> None:
    images = torch.from_numpy(_clustered(600, seed=3))
    owners = torch.arange(600).repeat_interleave(2)
    texts = F.normalize(images[owners] + 0.05 * torch.randn(1200, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    emb = EmbeddedSet(images, texts, owners, torch.full((600,), -1))
    exact = evaluate_embedded(emb, tasks=["retrieval"], classifier=None, use_gpu=False)["retrieval"]
    approx = evaluate_embedded(emb, tasks=["retrieval"], classifier=None, use_gpu=False,
                               search=SearchConfig(index="ivf_flat", nprobe=64, sample_for_recall=200))["retrieval"]
    # Every list probed: the IVF index is exact, so recall matches and so does its top-k overlap.
    assert approx["image_retrieval_search_recall_vs_exact@10"] == 1.0
    assert approx["text_retrieval_search_recall_vs_exact@10"] == 1.0
    assert {k: v for k, v in approx.items() if "search" not in k} == {k: v for k, v in exact.items() if "recall@" in k}
    assert "image_retrieval_mean_rank" not in approx  # unknown past the approximate top-k


def test_search_config_rejects_unknown_index() -> None:
    with pytest.raises(ClipkitConfigError, match="eval.search.index"):
        SearchConfig(index="annoy")
    with pytest.raises(ClipkitConfigError, match=">= 1"):
        SearchConfig(nprobe=0)


def test_build_search_config_reads_the_eval_section() -> None:
    assert build_search_config(OmegaConf.create({"batch_size": 8})) == SearchConfig()  # older configs: exact
    cfg = OmegaConf.create({"search": {"index": "hnsw", "ef_search": 128}})
    assert build_search_config(cfg) == SearchConfig(index="hnsw", ef_search=128)
    with pytest.raises(ClipkitConfigError, match="unknown key"):
        build_search_config(OmegaConf.create({"search": {"nlist": 4}}))
