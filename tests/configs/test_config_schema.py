"""The config schema (clipkit/schema.py): every option composes onto it unchanged, declared keys
need no `+`, and a misspelt or mistyped key is one stable line naming the key (and the closest
valid one, or the type), through the real CLIs and in-process through `preflight`."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from clipkit.config import CONF_DIR, compose_overrides, preflight
from clipkit.errors import ClipkitConfigError
from clipkit.schema import (
    ROOTS,
    EvalConfig,
    EvalSearchConfig,
    EvalSetConfig,
    LockImageConfig,
    loss_parameters,
    validate,
)

GROUPS = ["model", "loss", "data", "optim", "sched", "trainer", "eval", "logger", "launcher", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
SCHEMA_LINE = {"train": "  - clipkit_train_schema", "eval": "  - clipkit_eval_schema"}


def composed(*overrides: str, config_name: str = "train", conf_dir: Path = CONF_DIR):
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


@pytest.fixture(scope="module")
def schemaless_conf(tmp_path_factory) -> Path:
    """conf/ as it composed before the schema: the primary configs without their schema default."""
    conf = tmp_path_factory.mktemp("schemaless") / "conf"
    shutil.copytree(CONF_DIR, conf)
    for name, line in SCHEMA_LINE.items():
        path = conf / f"{name}.yaml"
        text = path.read_text()
        assert any(row.startswith(line) for row in text.splitlines()), f"{name}.yaml does not list its schema first"
        path.write_text("\n".join(row for row in text.splitlines() if not row.startswith(line)) + "\n")
    return conf


def _assert_only_adds(old, new, defaults, path=""):
    """Every key of `old` keeps its value in `new`; a key only `new` has holds the schema default."""
    if not isinstance(old, dict):
        assert old == new, f"{path}: {old!r} became {new!r}"
        return
    for key, value in new.items():
        where = f"{path}.{key}" if path else key
        if key in old:
            _assert_only_adds(old[key], value, defaults.get(key, {}) if isinstance(defaults, dict) else {}, where)
        else:
            assert value == defaults[key], f"{where}: a new key holds {value!r}, not its default {defaults[key]!r}"
    assert not set(old) - set(new), f"{path}: keys lost: {set(old) - set(new)}"


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_onto_the_schema_unchanged(group, option, schemaless_conf):
    cfg = composed(f"{group}={option}")
    validate(cfg)
    before = composed(f"{group}={option}", conf_dir=schemaless_conf)
    defaults = OmegaConf.to_container(OmegaConf.structured(ROOTS["train"][1]))
    _assert_only_adds(OmegaConf.to_container(before), OmegaConf.to_container(cfg), defaults)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "eval").glob("*.yaml")))
def test_the_eval_entry_config_composes_onto_its_schema_unchanged(option, schemaless_conf):
    cfg = composed(f"eval={option}", config_name="eval")
    validate(cfg, "eval")
    before = composed(f"eval={option}", config_name="eval", conf_dir=schemaless_conf)
    defaults = OmegaConf.to_container(OmegaConf.structured(ROOTS["eval"][1]))
    _assert_only_adds(OmegaConf.to_container(before), OmegaConf.to_container(cfg), defaults)


# The reference option of each group spells every key out; its values are the schema's defaults.
REFERENCE = {"trainer": "default", "data": "webdataset", "optim": "adamw", "sched": "cosine", "launcher": "local",
             "logger": "jsonl", "eval": "none"}


@pytest.mark.parametrize("group", sorted(REFERENCE))
def test_the_reference_options_agree_with_the_schema_defaults(group):
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{REFERENCE[group]}.yaml"))
    yaml.pop("defaults", None)
    defaults = OmegaConf.to_container(OmegaConf.structured(ROOTS["train"][1]))[group]

    def spelt(given, declared):   # the declared defaults of the keys the YAML spells out
        return {k: spelt(v, declared[k]) if isinstance(v, dict) and v else declared[k] for k, v in given.items()}
    given = {k: v for k, v in yaml.items() if v != "???"}
    assert given == spelt(given, defaults)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "loss").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_loss_yaml_declares_exactly_its_class_parameters(path):
    """The loss class's constructor is the loss group's schema."""
    cfg = OmegaConf.load(path)
    params = set(inspect.signature(get_class(cfg._target_)).parameters)
    assert set(cfg) - {"name", "_target_"} == params
    assert loss_parameters(cfg._target_) >= set(cfg)


def test_the_eval_set_and_search_schemas_match_their_readers():
    from clipkit.eval.runner import SearchConfig
    from clipkit.eval.suite import SOURCES

    set_keys = {f.name for f in dataclasses.fields(EvalSetConfig)}
    assert set(SOURCES) <= set_keys
    search = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    assert {f.name: f.default for f in dataclasses.fields(EvalSearchConfig)}.items() <= search.items()
    assert search["tie_tolerance"] == EvalConfig.tie_tolerance   # eval.tie_tolerance feeds SearchConfig


# Declared keys that an option's YAML does not spell out: set without `+`, in plain Hydra too.
UNSPELT = ["model.tail_drop_max=4", "model.patch_dropout=0.5", "model.unmasked_tuning_steps=7",
           "model.lock_image={unlocked_groups: 1}", "model.lock_text={unlocked_layers: 0}",
           "model.teacher={name: ViT-B-32, pretrained: /weights.pt}", "sched=constant", "sched.min_lr_ratio=0.1",
           "data.read_timeout_s=5", "eval.search.seed=3"]


@pytest.mark.parametrize("model", ["tiny_vit", "ViT-B-32"])
def test_declared_keys_need_no_plus(model):
    cfg = composed(f"model={model}", *UNSPELT)
    validate(cfg)
    assert cfg.model.tail_drop_max == 4 and cfg.model.patch_dropout == 0.5 and cfg.model.unmasked_tuning_steps == 7
    assert cfg.model.lock_image == {"unlocked_groups": 1} and cfg.model.teacher.name == "ViT-B-32"
    assert cfg.sched.min_lr_ratio == 0.1 and cfg.data.read_timeout_s == 5.0 and cfg.eval.search.seed == 3


def test_a_sub_dict_gets_its_declared_defaults_where_it_is_read():
    from clipkit.recipe import _section

    lock = _section(LockImageConfig, composed("model.lock_image={unlocked_groups: 1}").model.lock_image,
                    "model.lock_image")
    assert lock == LockImageConfig(unlocked_groups=1, freeze_bn_stats=False)


@pytest.mark.parametrize("overrides,composed_as", [
    (["+model.tail_drop_max=4"], ["model.tail_drop_max=4"]),   # an older command's `+` on a declared key
    (["+eval.sets.mine={folder: /x}"], ["+eval.sets.mine={folder: /x}"]),   # a new set: `+` is legitimate
    (["eval.sets.mine={folder: /x}"], ["+eval.sets.mine={folder: /x}"]),
    (["eval.sets.digits.caption_beams=3"], ["+eval.sets.digits.caption_beams=3"]),   # a key inside a sub-dict
    (["model=tiny_lit", "model.lock_image.unlocked_groups=1"],
     ["model=tiny_lit", "model.lock_image.unlocked_groups=1"]),
])
def test_plus_is_settled_for_hydra(overrides, composed_as):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg, settled = compose_overrides("train", overrides)
    assert settled == composed_as
    validate(cfg)


def train_error(*args: str, prog: str = "clipkit-train", config_name: str = "train") -> str:
    with pytest.raises(SystemExit) as stop:
        preflight(prog, config_name, list(args))
    return str(stop.value.code)


MISSPELT = [
    ("model.tail_drop_maxx=4", "model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?"),
    ("+model.tail_drop_maxx=4", "model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?"),
    ("++model.tail_drop_maxx=4", "model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?"),
    ("trainer.max_stpes=5", "trainer.max_stpes is not a key of trainer; did you mean trainer.max_steps?"),
    ("seedd=1", "seedd is not a key of the config; did you mean seed?"),
    ("data.worker=2", "data.worker is not a key of data; did you mean data.workers?"),
    ("optim.beta=[0.9,0.95]", "optim.beta is not a key of optim; did you mean optim.betas?"),
    ("eval.search.nprob=2", "eval.search.nprob is not a key of eval.search; did you mean eval.search.nprobe?"),
    ("model.lock_image={unlocked_group:1}",
     "model.lock_image.unlocked_group is not a key of model.lock_image; "
     "did you mean model.lock_image.unlocked_groups?"),
    ("model=tiny_lit model.lock_image.freeze_bn=true",
     "model.lock_image.freeze_bn is not a key of model.lock_image; did you mean model.lock_image.freeze_bn_stats?"),
    ("model.lock_text={unlocked_layer:0}",
     "model.lock_text.unlocked_layer is not a key of model.lock_text; did you mean model.lock_text.unlocked_layers?"),
    ("model=tiny_distill model.teacher.pretraned=/x.pt",
     "model.teacher.pretraned is not a key of model.teacher; did you mean model.teacher.pretrained?"),
    ("eval.sets.digits.classname=[a]",
     "eval.sets.digits.classname is not a key of eval.sets.digits; did you mean eval.sets.digits.classnames?"),
    ("+eval.sets.mine={folders:/x}",
     "eval.sets.mine.folders is not a key of eval.sets.mine; did you mean eval.sets.mine.folder?"),
    ("loss.chunk_sizes=8", "loss.chunk_sizes is not a key of loss; did you mean loss.chunk_size?"),
    ("loss=filip loss.token_keep=0.5", "loss.token_keep is not a key of loss; did you mean loss.token_keep_ratio?"),
    ("logger=wandb logger.wandb.projet=x",
     "logger.wandb.projet is not a key of logger.wandb; did you mean logger.wandb.project?"),
    ("logger.wandb.project=x", "logger.wandb.mode is not set; choose logger=wandb, which sets every key"),
    ("launcher.requeu=true", "launcher.requeu is not a key of launcher; did you mean launcher.requeue?"),
    ("model.zzz=1", "model.zzz is not a key of model; its keys are config, context_length, grad_checkpointing, heads, "
                    "lock_image, lock_text, name, patch_dropout, pos_stretch, pretrained, tail_drop_max, teacher, "
                    "unmasked_tuning_steps"),
]
MISTYPED = [
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
    ("trainer.zero_stage=two", "trainer.zero_stage must be an integer, got 'two'"),
    ("data.workers=1.5", "data.workers must be an integer, got 1.5"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
    ("trainer.compile=maybe", "trainer.compile must be true or false, got 'maybe'"),
    ("trainer.epochs=two", "trainer.epochs must be a number or null, got 'two'"),
    ("~model.tail_drop_max", "model.tail_drop_max is declared in clipkit/schema.py and cannot be deleted "
                             "(~model.tail_drop_max); set its value instead"),
    ("data.weights=[a,b]", "data.weights[0] must be a number, got 'a'"),
    ("model.patch_dropout=half", "model.patch_dropout must be a number, got 'half'"),
    ("model.lock_image={unlocked_groups:abc}", "model.lock_image.unlocked_groups must be an integer, got 'abc'"),
    ("model.lock_image=yes", "model.lock_image must be a dict (or null), got 'yes'"),
    ("eval.sets.digits.caption_beams=many", "eval.sets.digits.caption_beams must be an integer, got 'many'"),
]


@pytest.mark.parametrize("override,expected", MISSPELT + MISTYPED, ids=[o for o, _ in MISSPELT + MISTYPED])
def test_bad_key_is_one_line(override, expected):
    assert train_error(*override.split()) == f"clipkit-train: error: {expected}"


def test_the_eval_cli_checks_its_schema():
    assert train_error("run_dir=x", "eval.sets.digits.splt=val", prog="clipkit-eval", config_name="eval") == (
        "clipkit-eval: error: eval.sets.digits.splt is not a key of eval.sets.digits; "
        "did you mean eval.sets.digits.split?")
    assert train_error("rundir=x", prog="clipkit-eval", config_name="eval") == \
        "clipkit-eval: error: rundir is not a key of the config; did you mean run_dir?"


def test_a_key_in_a_users_yaml_is_named_with_its_file(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("defaults:\n  - tiny_vit\n  - _self_\ntail_drop_maxx: 2\n")
    assert train_error("--config-dir", str(tmp_path), "model=mine") == ("clipkit-train: error: model.tail_drop_maxx "
                                                                      "is not a key of model; did you mean "
                                                                      "model.tail_drop_max? (in model/mine)")


def test_an_unimportable_loss_target_is_one_line():
    assert train_error("loss._target_=clipkit.losses.Nope").startswith(
        "clipkit-train: error: loss._target_='clipkit.losses.Nope' cannot be imported")


def test_the_config_is_frozen_once_prepared():
    from clipkit.train import prepare

    cfg = prepare(composed("trainer.epochs=2"))   # digits: 1,437 samples, global batch 128
    assert cfg.trainer.max_steps == 23 and OmegaConf.is_readonly(cfg)
    with pytest.raises(ReadonlyConfigError):
        cfg.trainer.max_steps = 5
    assert prepare(cfg) is cfg


def test_validate_refuses_what_plain_hydra_lets_in():
    cfg = composed("+model.tail_drop_maxx=4")   # Hydra's force-add, without preflight
    with pytest.raises(ClipkitConfigError, match=r"did you mean model\.tail_drop_max\?"):
        validate(cfg)


# Through the real CLIs: `--cfg job` prints the config without reading any path, and still checks the schema.
CLI = [
    ("clipkit.train", "model.tail_drop_maxx=4",
     "clipkit-train: error: model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?"),
    ("clipkit.train", "+model.tail_drop_maxx=4",
     "clipkit-train: error: model.tail_drop_maxx is not a key of model; did you mean model.tail_drop_max?"),
    ("clipkit.train", "trainer.zero_stage=two",
     "clipkit-train: error: trainer.zero_stage must be an integer, got 'two'"),
    ("clipkit.evaluate", "eval.search.nprob=2",
     "clipkit-eval: error: eval.search.nprob is not a key of eval.search; did you mean eval.search.nprobe?"),
]


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLIPKIT_ROOT": str(cwd)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module,override,expected", CLI, ids=[f"{m}:{o}" for m, o, _ in CLI])
def test_the_cli_refuses_a_bad_key_in_one_line(module, override, expected, tmp_path):
    proc = _cli(module, override, "--cfg", "job", cwd=tmp_path)
    assert proc.returncode != 0 and proc.stdout == ""
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [expected]
    assert not (tmp_path / "outputs").exists()


def test_the_cli_takes_declared_keys_without_plus(tmp_path):
    proc = _cli("clipkit.train", "model=ViT-B-32", "model.tail_drop_max=4", "+model.patch_dropout=0.5",
                "model.lock_image={unlocked_groups:1}", "eval.sets.digits.caption_beams=2", "--cfg", "job",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.tail_drop_max == 4 and cfg.model.patch_dropout == 0.5
    assert cfg.model.lock_image.unlocked_groups == 1 and cfg.eval.sets.digits.caption_beams == 2
