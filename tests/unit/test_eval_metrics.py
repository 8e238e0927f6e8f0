"""CLIP_benchmark metric definitions on hand-made cases, and parity with the real metric code
of CLIP_benchmark 1.6.2 (`clip_benchmark.metrics`) and open_clip (`open_clip_train`) on the
same embeddings.

Their functions run for real, with one adaptation: `accuracy()` in both libraries ends in
`float(t.sum(0, keepdim=True).cpu().numpy())`, a float() of a shape-[1] array. NumPy 2.4
removed that conversion (deprecated since 1.25), so under numpy >= 2.4 it raises "TypeError:
only 0-dimensional arrays can be converted to Python scalars" (CLIP_benchmark issue #147).
`_old_numpy_float` puts numpy < 2.4's float() into those modules' globals for the call; the
top-k, comparison and counting stay theirs. Both libraries break score ties by sort order, so
parity runs on tie-free embeddings (checked), and the tie test shows where they differ.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from clipkit.eval import EmbeddedSet, evaluate_embedded, zeroshot_classifier
from clipkit.eval.metrics import TIE_ATOL, classification_metrics, retrieval_metrics, retrieval_metrics_exact
from clipkit.eval.search import topk_inner_product

# CLIP_benchmark's pip requirements (transformers, pycocoevalcap with its Java jars) are for its
# CLI; its metric modules need only torch, tqdm and sklearn. `make setup` installs it --no-deps.
try:
    from clip_benchmark.metrics import zeroshot_classification as cb_classification
    from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
except ImportError:
    cb_classification = cb_retrieval = None
needs_clip_benchmark = pytest.mark.skipif(
    cb_retrieval is None,
    reason="clip-benchmark missing: pip install --no-deps clip-benchmark==1.6.2 (make setup does)")
from open_clip_train import train as oc_train  # noqa: E402  (in the open_clip_torch wheel)
from open_clip_train import zero_shot as oc_zero_shot  # noqa: E402


def _ranked(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")


def _true_class_ranks(top: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based position of each label in a full ranked class list."""
    return (top == labels[:, None]).argmax(axis=1) + 1


def test_classification_imbalanced_hand_case() -> None:
    labels = np.array([0, 0, 0, 0, 1, 2, 1])
    ranks = np.array([1, 1, 1, 1,
                      4,   # label 1 at rank 4: top-5 hit, top-1 miss
                      1,
                      6])  # label 1 at rank 6: miss even at top-5
    m = classification_metrics(ranks, labels, num_classes=6)
    assert m["acc1"] == pytest.approx(5 / 7)
    assert m["acc5"] == pytest.approx(6 / 7)
    # Per-class top-1 recall: class 0 4/4, class 1 0/2, class 2 1/1 -> 2/3, not acc1's 5/7.
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)


def test_classification_acc5_nan_below_five_classes() -> None:
    m = classification_metrics(np.array([1, 2]), np.array([0, 1]), num_classes=3)
    assert math.isnan(m["acc5"]) and m["acc1"] == 0.5 and m["mean_per_class_recall"] == 0.5
    with pytest.raises(ValueError, match="ranks must lie"):
        classification_metrics(np.array([1, 4]), np.array([0, 1]), num_classes=3)


def test_classification_matches_sklearn_and_topk_on_random_logits() -> None:
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((500, 12)), rng.choice(12, 500, p=np.linspace(1, 3, 12) / 24)
    m = classification_metrics(_true_class_ranks(_ranked(logits), labels), labels, num_classes=12)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert m["acc1"] == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert m["acc5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(1)))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))


def test_classification_tie_with_another_class_is_a_miss_whatever_the_class_order() -> None:
    # Classes 0 and 1 have the same embedding: an image of either ties them at the top.
    classifier = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], np.float32)
    images = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], np.float32)
    emb = EmbeddedSet(image_emb=torch.from_numpy(images), text_emb=torch.zeros(0, 3),
                      labels=torch.tensor([0, 1, 2]), text_image_index=torch.zeros(0, dtype=torch.long))
    got = evaluate_embedded(emb, tasks=["zeroshot_classification"],
                            classifier=torch.from_numpy(classifier))["zeroshot_classification"]
    # Breaking the tie by class index (torch.topk, argsort) would make image 0 a hit: acc1 2/3.
    assert got["acc1"] == pytest.approx(1 / 3)  # only the untied class is a hit
    assert got["mean_per_class_recall"] == pytest.approx(1 / 3)


# 4 captions x 3 images; image 0 owns captions 0 and 1, image 1 caption 2, image 2 caption 3.
_TEXT_IMAGE = np.array([0, 0, 1, 2])
_SCORES = np.array([  # text @ image.T
    [0.1, 0.9, 0.5],  # own image ranked 3rd
    [0.9, 0.2, 0.1],  # 1st
    [0.3, 0.8, 0.1],  # 1st
    [0.7, 0.1, 0.2],  # 2nd
])


def test_retrieval_hand_case_any_caption_counts() -> None:
    m = retrieval_metrics(_ranked(_SCORES), _ranked(_SCORES.T), _TEXT_IMAGE, recall_k=(1, 2, 5))
    assert m["image_retrieval_recall@1"] == 0.5
    assert m["image_retrieval_recall@2"] == 0.75
    assert m["image_retrieval_recall@5"] == 1.0
    # Image 0's best caption is its 2nd one, caption 0 ranks last: "any caption" gives a hit.
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == 1.0
    assert m["text_retrieval_recall@5"] == 1.0


def test_retrieval_skips_images_without_captions_as_text_queries() -> None:
    scores = np.hstack([_SCORES, np.full((4, 1), -1.0)])  # image 3: a distractor with no caption
    m = retrieval_metrics(_ranked(scores), _ranked(scores.T), _TEXT_IMAGE, recall_k=(1,))
    assert m == {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": pytest.approx(1 / 3)}



def _old_numpy_float(x) -> float:
    """float() as numpy < 2.4 did it: a size-1 array of any shape converts (an error otherwise)."""
    return float(x.reshape(())) if isinstance(x, np.ndarray) else float(x)


@pytest.fixture
def old_numpy_float(monkeypatch):
    # A module global shadows the builtin inside that module's functions only.
    for module in (cb_classification, oc_zero_shot):
        if module is not None:
            monkeypatch.setattr(module, "float", _old_numpy_float, raising=False)


def test_their_accuracy_fails_on_numpy_2_4_exactly_at_the_scalar_conversion() -> None:
    if tuple(int(p) for p in np.__version__.split(".")[:2]) < (2, 4):
        pytest.skip("numpy < 2.4 still converts shape-[1] arrays")
    logits, target = torch.randn(6, 5), torch.arange(6) % 5
    for module in (m for m in (cb_classification, oc_zero_shot) if m is not None):
        with pytest.raises(TypeError, match="only 0-dimensional arrays"):
            module.accuracy(logits, target, topk=(1,))
    with pytest.raises(TypeError, match="only 0-dimensional arrays"):
        float(np.zeros(1))


class _Encoders(torch.nn.Module):
    """A CLIP-like model over fixed embeddings: images are their embeddings already, and the
    tokenizer turns each string into its row of `text_table`."""

    def __init__(self, texts: list[str], text_table: torch.Tensor):
        super().__init__()
        self.row = {t: i for i, t in enumerate(texts)}
        self.text_table = text_table

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.row[t] for t in texts])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(images, dim=-1) if normalize else images

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        emb = self.text_table[tokens]
        return F.normalize(emb, dim=-1) if normalize else emb

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # open_clip's run() calls model(image=...)
        return {"image_features": self.encode_image(image, normalize=True)}


class _Loader(list):
    """A list of batches that also carries `.dataset.classes`, as CLIP_benchmark reads it."""

    def __init__(self, batches, classes=None):
        super().__init__(batches)
        self.dataset = SimpleNamespace(classes=classes)


def _batches(*columns, size: int = 32):
    n = len(columns[0])
    return [tuple(c[s:s + size] for c in columns) for s in range(0, n, size)]


def _assert_tie_free(scores: np.ndarray, correct: np.ndarray) -> None:
    """No wrong item within 2 TIE_ATOL of a query's best correct one: ties cannot decide anything."""
    best = np.where(correct, scores, -np.inf).max(1)
    gap = np.abs(np.where(correct, np.inf, scores) - best[:, None]).min()
    assert gap > 2 * TIE_ATOL, "the seed produced a near-tie; pick another"


CLASSES = ["zero", "one", "two", "three", "four", "five", "six"]
PROMPTS = ["a photo of a {c}.", "a drawing of the {c}.", "{c}!"]


def _classification_case(n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    classes = CLASSES[:n_classes]
    prompts = [p.replace("{c}", c) for c in classes for p in PROMPTS]
    model = _Encoders(prompts, torch.from_numpy(rng.standard_normal((len(prompts), 16), dtype=np.float32)))
    centres = zeroshot_classifier(lambda t: model.encode_text(model.tokenize(t)), classes, PROMPTS)
    labels = torch.from_numpy(rng.choice(n_classes, 300, p=np.linspace(1, 3, n_classes) / (2 * n_classes)))
    images = F.normalize(centres[labels] + 0.45 * torch.randn(300, 16, generator=torch.Generator().manual_seed(seed)),
                         dim=-1)
    return model, classes, centres, images, labels


@needs_clip_benchmark
@pytest.mark.parametrize("n_classes", [7, 4])  # 4: acc5 is NaN on both sides
def test_zero_shot_matches_clip_benchmark_evaluate(n_classes: int, old_numpy_float) -> None:
    model, classes, centres, images, labels = _classification_case(n_classes)
    scores = images.double() @ centres.double().T
    assert np.diff(np.sort(scores.numpy(), 1), axis=1).min() > 2 * TIE_ATOL  # no two classes tie for any image
    theirs = cb_classification.evaluate(model, _Loader(_batches(images, labels), classes), model.tokenize, classes,
                                        PROMPTS, "cpu", amp=False)
    emb = EmbeddedSet(images, images[:0], labels[:0], labels)
    ours = evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=centres,
                             use_gpu=False)["zeroshot_classification"]
    assert ours.keys() == theirs.keys()
    assert 0.3 < ours["acc1"] < 0.95 and ours["acc1"] != ours["mean_per_class_recall"]  # imbalanced, not trivial
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], nan_ok=True), key


def test_zero_shot_matches_open_clip_classifier_and_run(old_numpy_float) -> None:
    from open_clip import build_zero_shot_classifier

    model, classes, centres, images, labels = _classification_case(7, seed=1)
    templates = [lambda c, p=p: p.replace("{c}", c) for p in PROMPTS]
    theirs_classifier = build_zero_shot_classifier(model, model.tokenize, classes, templates, num_classes_per_batch=3)
    torch.testing.assert_close(theirs_classifier.T, centres, rtol=0, atol=1e-6)
    args = SimpleNamespace(device="cpu", precision="fp32", batch_size=32)
    top1, top5 = oc_zero_shot.run(model, theirs_classifier, _batches(images, labels), args)
    emb = EmbeddedSet(images, images[:0], labels[:0], labels)
    ours = evaluate_embedded(emb, tasks=["zeroshot_classification"], classifier=centres,
                             use_gpu=False)["zeroshot_classification"]
    assert (ours["acc1"], ours["acc5"]) == (pytest.approx(top1), pytest.approx(top5))
    assert 0.3 < top1 < top5 < 1


def _retrieval_case(n_images: int, max_captions: int, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n_images, 8)).astype(np.float32)
    owner = np.repeat(np.arange(n_images), rng.integers(1, max_captions + 1, n_images))
    text = image[owner] + 1.2 * rng.standard_normal((len(owner), 8)).astype(np.float32)
    image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
    scores = text.astype(np.float64) @ image.T.astype(np.float64)
    correct = owner[:, None] == np.arange(n_images)[None]
    _assert_tie_free(scores, correct)
    _assert_tie_free(scores.T, correct.T)
    return torch.from_numpy(image), torch.from_numpy(text), torch.from_numpy(owner)


def _clip_benchmark_retrieval(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, ks) -> dict:
    captions = [f"caption {j}" for j in range(len(text))]
    model = _Encoders(captions, text)
    per_image = [[c for c, o in zip(captions, owner.tolist()) if o == i] for i in range(len(image))]
    batches = [(image[s:s + 32], per_image[s:s + 32]) for s in range(0, len(image), 32)]
    return cb_retrieval.evaluate(model, batches, model.tokenize, "cpu", amp=False, recall_k_list=list(ks))


@needs_clip_benchmark
def test_retrieval_matches_clip_benchmark_evaluate_with_several_captions() -> None:
    image, text, owner = _retrieval_case(80, 4, seed=1)
    theirs = _clip_benchmark_retrieval(image, text, owner, (1, 5, 10))
    ours = evaluate_embedded(EmbeddedSet(image, text, owner, torch.full((80,), -1)), tasks=["retrieval"],
                             classifier=None, use_gpu=False)["retrieval"]
    assert {k: v for k, v in ours.items() if "recall@" in k} == pytest.approx(theirs)
    assert 0 < ours["text_retrieval_recall@1"] < 1 and 0 < ours["image_retrieval_recall@1"] < 1
    # The top-k path (approximate indexes use it) agrees too.
    _, t2i = topk_inner_product(text.numpy(), image.numpy(), 10, gallery_chunk=16, use_gpu=False)
    _, i2t = topk_inner_product(image.numpy(), text.numpy(), 13, gallery_chunk=16, use_gpu=False)
    assert retrieval_metrics(t2i, i2t, owner.numpy()) == pytest.approx(theirs)


@pytest.mark.parametrize("n", [101, 100])
def test_retrieval_and_ranks_match_open_clip_get_clip_metrics(n: int) -> None:
    image, text, owner = _retrieval_case(n, 1, seed=2)  # open_clip scores 1:1 pairs only
    theirs = oc_train.get_clip_metrics(image, text, torch.tensor(1.0))
    ours = retrieval_metrics_exact(text.numpy(), image.numpy(), owner.numpy())
    for oc_name, name in (("image_to_text", "text_retrieval"), ("text_to_image", "image_retrieval")):
        for k in (1, 5, 10):
            assert ours[f"{name}_recall@{k}"] == pytest.approx(theirs[f"{oc_name}_R@{k}"])
        assert ours[f"{name}_mean_rank"] == pytest.approx(theirs[f"{oc_name}_mean_rank"])
        # open_clip floors the median (floor(median of 0-based ranks) + 1); clipkit reports numpy's
        # median, which is x.5 when an even number of queries has two middle ranks that differ.
        assert math.floor(ours[f"{name}_median_rank"]) == theirs[f"{oc_name}_median_rank"]
        if n % 2:
            assert ours[f"{name}_median_rank"] == theirs[f"{oc_name}_median_rank"]


def test_ties_count_against_the_query_where_both_libraries_use_sort_order() -> None:
    # Images 0 and 1 are the same vector; captions 0 (of image 0) and 1 (of image 1) are the same
    # vector too. Each caption ties its own image with a wrong one, each image ties its caption with
    # a wrong one. Image 2 and caption 2 are an untied pair.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = F.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.2], [0.0, 1.0]]), dim=-1)
    owner = torch.arange(3)
    ours = retrieval_metrics_exact(text.numpy(), image.numpy(), owner.numpy(), recall_k=(1, 2))
    # clipkit: a tied wrong item is ranked ahead, so the tied queries have rank 2 (module docstring).
    assert ours["image_retrieval_recall@1"] == ours["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert ours["image_retrieval_recall@2"] == ours["text_retrieval_recall@2"] == 1.0
    assert ours["image_retrieval_mean_rank"] == pytest.approx(5 / 3)
    # CLIP_benchmark (torch.topk) and open_clip (argsort) put one of the two tied items first,
    # the same for both identical queries, so exactly one of the two is a hit: recall@1 = 2/3.
    if cb_retrieval is not None:
        theirs = _clip_benchmark_retrieval(image, text, owner, (1, 2))
        assert theirs["image_retrieval_recall@1"] == theirs["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    oc = oc_train.get_clip_metrics(image, text, torch.tensor(1.0))
    assert oc["text_to_image_R@1"] == oc["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert oc["text_to_image_mean_rank"] == pytest.approx(4 / 3)
