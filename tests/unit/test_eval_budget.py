"""The zero-shot head built once per (checkpoint, set) in one batched, deduplicated pass and cached;
each set's eval time split (decode, image tower, text tower, search and ranks); the one-time
warning when evals outgrow their share of training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipkit.errors import ClipkitConfigError
from clipkit.eval.budget import EvalBudget
from clipkit.eval.suite import TIME_PARTS, EvalSuite, build_eval_specs
from clipkit.eval.zeroshot import zeroshot_classifier


def _encoder(calls: list[list[str]]):
    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        g = torch.Generator()
        return torch.stack([torch.randn(6, generator=g.manual_seed(sum(map(ord, t)) * 31 + len(t)), dtype=torch.float64)
                            for t in texts]).float()
    return encode


def test_zeroshot_head_is_one_deduplicated_batched_pass_equal_to_the_per_class_loop() -> None:
    classes = ["cat", "dog", "cat", "bird"]                      # a repeated class name
    templates = ["a {c}.", "a photo of a {c}.", "a {c}.", "{c}"]  # a repeated template
    calls: list[list[str]] = []
    stats: dict = {}
    got = zeroshot_classifier(_encoder(calls), classes, templates, batch_size=3, stats=stats)
    assert stats == {"prompts": 16, "encoded": 9}                # 3 classes x 3 distinct templates
    assert [len(c) for c in calls] == [3, 3, 3]                   # across classes, in batches
    flat = [p for c in calls for p in c]
    assert len(set(flat)) == len(flat) and [len(p) for p in flat] == sorted(len(p) for p in flat)
    encode = _encoder([])
    for row, name in zip(got, classes):                          # the plain per-class ensemble, float64
        per_template = F.normalize(encode([t.replace("{c}", name) for t in templates]).double(), dim=-1)
        torch.testing.assert_close(row.double(), F.normalize(per_template.mean(0), dim=0), atol=1e-6, rtol=0)
    assert torch.equal(got[0], got[2])


def test_budget_warns_once_naming_the_slowest_part(caplog) -> None:
    now = [0.0]
    budget = EvalBudget(0.25, clock=lambda: now[0])
    budget.start_training()
    split = {"digits": {"decode": 0.5, "image_tower": 0.2, "text_tower": 0.1, "search_and_ranks": 0.2},
             "long": {"decode": 0.1, "image_tower": 0.1, "text_tower": 3.0, "search_and_ranks": 0.1}}
    caplog.set_level(logging.INFO, logger="clipkit.eval")
    now[0] = 100.0
    metrics = budget.record(10, {"digits": split["digits"]}, 1.0)   # 1 s of eval after 100 s of training
    assert metrics["eval_time/digits/decode_s"] == 0.5 and metrics["eval_time/total_s"] == 1.0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    now[0] = 140.0
    budget.record(20, split, 30.0)                                  # 31 s of eval vs 109 s of training
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "text tower of set long" in warnings[0] and "eval.budget_share=0.25" in warnings[0]
    now[0] = 300.0
    budget.record(30, split, 100.0)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1   # once
    assert any("search and ranks" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    with pytest.raises(ClipkitConfigError, match="budget_share"):
        EvalBudget(0.0)


def test_final_eval_alone_never_warns(caplog) -> None:
    budget = EvalBudget(0.01, clock=lambda: 1.0)
    budget.start_training()
    budget.record(4, {"s": dict.fromkeys(TIME_PARTS, 1.0)}, 50.0, in_training=False)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from clipkit.data import write_digits_shards

    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(root)
    return root


def test_suite_time_split_and_cached_zeroshot_head(digits: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from clipkit.config import CONF_DIR
    from clipkit.objective import ContrastiveObjective
    from clipkit.recipe import build_towers

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        model_cfg = compose("train", overrides=["model=tiny_vit"]).model
    torch.manual_seed(0)
    bundle = build_towers(model_cfg)
    specs = build_eval_specs({"digits": {"clip_benchmark": str(digits), "tasks": ["zeroshot_classification", "retrieval"]}})
    objective = ContrastiveObjective(bundle.model.eval(), loss=None)

    def suite():
        return EvalSuite(specs, preprocess=bundle.preprocess_val, tokenizer=bundle.tokenizer, batch_size=128,
                         out_dir=None, model_name="tiny", cache_dir=tmp_path / "cache")

    first = suite()
    metrics = first.run(objective, device="cpu", tag="step_1")
    split = first.last_timings["digits"]
    assert set(split) == set(TIME_PARTS) and all(split[p] > 0 for p in TIME_PARTS)
    heads = list((tmp_path / "cache").rglob("classifier-*.npy"))
    assert len(heads) == 1 and "step_1-zeroshot" in str(heads[0])

    again = suite()
    assert again.run(objective, device="cpu", tag="step_1") == metrics   # both from the cache
    cached = again.last_timings["digits"]
    assert cached["text_tower"] == cached["image_tower"] == cached["decode"] == 0.0
