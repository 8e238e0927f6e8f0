"""Composition helpers: shell brace patterns quoted for Hydra, epoch budgets, user config dirs,
the data group's eval default, and the eval scorer choice."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clipkit.config import CONF_DIR, quote_brace_patterns, resolve_step_budget
from clipkit.errors import ClipkitConfigError
from clipkit.eval.scoring import LateInteraction, PooledCosine, build_scorer


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("given,expected", [
    ("data.train_urls=/data/laion/{00000..41407}.tar", "data.train_urls='/data/laion/{00000..41407}.tar'"),
    ("data.train_urls=/a/{0..9}.tar::pipe:aws s3 cp s3://b/{000..099}.tar -",
     "data.train_urls='/a/{0..9}.tar::pipe:aws s3 cp s3://b/{000..099}.tar -'"),
    ("data.train_urls=/x/{a,b}.tar", "data.train_urls='/x/{a,b}.tar'"),
    ("data.train_urls='/q/{0..3}.tar'", "data.train_urls='/q/{0..3}.tar'"),     # already quoted for Hydra
    ("model.config={embed_dim: 64}", "model.config={embed_dim: 64}"),          # a Hydra dict
    ("loss=siglip", "loss=siglip"),
])
def test_shell_brace_patterns_are_quoted_for_hydra(given, expected):
    assert quote_brace_patterns(given) == expected


def test_the_quoted_brace_form_composes_to_the_pattern():
    cfg = composed("data=webdataset", quote_brace_patterns("data.train_urls=/data/laion/{00000..41407}.tar"))
    assert cfg.data.train_urls == "/data/laion/{00000..41407}.tar"


def test_own_data_turns_the_demo_eval_off_unless_an_eval_is_chosen():
    assert dict(composed("data=webdataset", "data.train_urls=/x.tar").eval.sets) == {}
    assert "digits" in composed("data=webdataset", "data.train_urls=/x.tar", "eval=digits").eval.sets
    assert "digits" in composed().eval.sets and "digits" in composed("experiment=demo_digits").eval.sets


def test_epochs_become_steps_from_the_epoch_length():
    cfg = composed("trainer.epochs=2")   # digits: 1,437 samples per epoch, global batch 128
    resolve_step_budget(cfg)
    assert cfg.trainer.max_steps == 23
    cfg = composed("data=mixture", "trainer.epochs=0.5")   # resampled: data.epoch_samples
    resolve_step_budget(cfg)
    assert cfg.trainer.max_steps == 6
    cfg = composed()
    resolve_step_budget(cfg)
    assert cfg.trainer.max_steps == 1000   # no epochs: max_steps as given
    with pytest.raises(ClipkitConfigError, match="needs the epoch length: set data.train_num_samples"):
        resolve_step_budget(composed("data=webdataset", "data.train_urls=/x.tar", "trainer.epochs=1"))


def test_a_user_config_dir_extends_the_shipped_groups(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /loss: siglip\ntrainer:\n  max_steps: 7\n")
    cfg = composed("experiment=mine", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.loss.name == "siglip" and cfg.trainer.max_steps == 7 and cfg.model.name == "clipkit-tiny-vit"


def test_the_scorer_is_chosen_from_the_key_or_the_loss():
    assert isinstance(build_scorer("auto", ("image", "text")), PooledCosine)
    assert isinstance(build_scorer("auto", ("image_tokens", "image_mask", "text_tokens", "text_mask")), LateInteraction)
    assert isinstance(build_scorer("late_interaction"), LateInteraction)
    assert isinstance(build_scorer("pooled", ("image_tokens",)), PooledCosine)
    with pytest.raises(ClipkitConfigError, match="eval.scoring='dense'"):
        build_scorer("dense")


def test_every_eval_option_declares_the_scoring_and_tie_keys():
    for name in ("digits", "none"):
        cfg = OmegaConf.load(CONF_DIR / "eval" / f"{name}.yaml")
        assert cfg.scoring == "auto" and cfg.tie_tolerance == 1e-6
