"""`eval=none` wins over the eval an experiment brings: every shipped experiment
(conf/experiment/*.yaml) composes with it, has no eval sets left, and trains 2 steps through
`clipkit-train` without evaluating. An experiment that changes a set selects an eval option
(coca_digits: `override /eval: digits_coca`) instead of adding keys under `eval.sets`, which
would outlive `eval=none` as a set without a source."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import CONF_DIR, run_cli
from hydra import compose, initialize_config_dir

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_experiment_is_listed() -> None:
    assert {"coca_digits", "demo_digits", "captions_digits_long", "captions_digits_short",
            "captions_digits_negatives"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_eval_none_composes_without_sets(experiment: str) -> None:
    from clipkit.train import prepare

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "eval=none"])
    prepare(cfg)
    assert dict(cfg.eval.sets) == {}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_eval_none_trains_two_steps(experiment: str, digits_root, demo_export) -> None:
    run_name = f"eval_none_{experiment}"
    run_cli([sys.executable, "-m", "clipkit.train", f"experiment={experiment}", "eval=none", "debug=fast",
             "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=0", f"run_name={run_name}"], digits_root)
    run_dir = digits_root / "outputs" / run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if "train/loss" in r) == 2
    assert not any(k.startswith("digits") for r in records for k in r)   # nothing was evaluated
    assert not list((run_dir / "eval").glob("*.json")) if (run_dir / "eval").exists() else True
