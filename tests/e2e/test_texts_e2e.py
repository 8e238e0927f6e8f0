"""Several texts per image (`data.texts`), through `clipkit-train` on the two-level caption demo
(`clipkit-shards digits-captions`, roles alt, full, long with 4 sub-captions, neg hard negatives),
shrunk to 6 train shards of 15 samples or fewer so an epoch is a few steps:

- the captions_digits_negatives recipe on 2 ranks (ZeRO 0) trains, and its logged per-term
  losses `train/loss_<term>` sum with the terms' weights to `train/loss`;
- that run's checkpoint resumed on 1 rank reads every sample of each started epoch exactly once
  (the key logs), and a sample's chosen texts in an epoch are the same on 2 ranks, on 1 rank and
  in an uninterrupted 1-rank run: the pure function of (seed, epoch, url#key, role) that
  `clipkit.data.texts` defines, recomputed here from the shards;
- bad text data (a `.json` without the long caption, with an empty one, not utf-8, not JSON, a
  caption that is not a string, a `.txt` missing or not utf-8) is skipped and counted under its
  reason in metrics.jsonl's `data/skipped/*`, while a sample without its optional hard
  negatives trains.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, torchrun

GLOBAL_BATCH, SAVE_AT, FINAL = 12, 6, 26
WEIGHTS = {"alt": 1.0, "full": 0.5, "long": 2.0}   # captions_digits_negatives' terms, reweighted
RECIPE = ["experiment=captions_digits_negatives", *(f"loss.terms.{t}.weight={w}" for t, w in WEIGHTS.items())]


@pytest.fixture(scope="module")
def caption_root(tmp_path_factory) -> Path:
    """A CLIPKIT_ROOT whose data/digits_captions holds ~89 training samples in 6 shards (15, ..., 14)."""
    from clipkit.data import write_digits_caption_shards

    root = tmp_path_factory.mktemp("texts_root")
    write_digits_caption_shards(root / "data" / "digits_captions", test_fraction=0.95, shard_size=15)
    return root


def train_args(root: Path, run_name: str, *more: str, urls: str = "digits_captions/train/{00000..00005}") -> list[str]:
    return ["-m", "clipkit.train", *RECIPE, "debug=fast", "eval=none", "trainer.export_open_clip=false",
            f"data.train_urls={root}/data/{urls}.tar", "data.streams_per_rank=2",
            f"data.global_batch_size={GLOBAL_BATCH}", "data.record_keys=true", "trainer.log_every_n_steps=1",
            "sched=constant",   # the lr does not depend on max_steps, which the resumed run raises
            f"run_name={run_name}", *more]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def chosen_texts(run_dir: Path) -> dict[tuple[str, int], dict[str, list]]:
    """(url#key, epoch) -> {role: chosen texts' indices}, over every rank's key log; a pair read
    twice must have chosen alike."""
    chosen: dict[tuple[str, int], dict[str, list]] = {}
    for path in sorted((run_dir / "data_keys").glob("rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            for i, (key, epoch) in enumerate(zip(record["keys"], record["epochs"], strict=True)):
                texts = {role: per_key[i] for role, per_key in record["texts"].items()}
                assert chosen.setdefault((key, epoch), texts) == texts, (key, epoch)
    return chosen


def epoch_keys(run_dir: Path) -> dict[int, Counter]:
    counts: dict[int, Counter] = defaultdict(Counter)
    for path in sorted((run_dir / "data_keys").glob("rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            for key, epoch in zip(record["keys"], record["epochs"], strict=True):
                counts[epoch][key] += 1
    return counts


def recomputed(run_dir: Path, pairs) -> dict[tuple[str, int], dict[str, list]]:
    """The selection of each (url#key, epoch) in `pairs`, from the shards and the run's config
    alone: `select_texts` with the RNG of (seed, epoch, url#key, role)."""
    from clipkit.data.texts import read_roles, role_rng, roles_from_config, select_texts

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    roles = roles_from_config(cfg["data"]["texts"])
    members: dict[str, dict[str, dict[str, bytes]]] = {}
    out = {}
    for name, epoch in pairs:
        url, key = name.rsplit("#", 1)
        if url not in members:
            members[url] = defaultdict(dict)
            with tarfile.open(url) as tar:
                for member in tar.getmembers():
                    stem, ext = member.name.split(".", 1)
                    members[url][stem][ext] = tar.extractfile(member).read()
        pools, reason = read_roles(roles, members[url][key])
        assert not reason, (name, reason)
        out[(name, epoch)] = {role.name: [list(indices) for _, indices in select_texts(
            role, pools[role.name], role_rng(cfg["seed"], epoch, url, key, role.name))] for role in roles}
    return out


@pytest.fixture(scope="module")
def two_ranks(caption_root) -> Path:
    """The recipe on 2 ranks at ZeRO 0, 2 streams each, checkpointed at step 6 with epochs 0 and 1 started."""
    run_cli(torchrun(2, train_args(caption_root, "texts_w2", f"trainer.max_steps={SAVE_AT}", "trainer.zero_stage=0",
                                   f"trainer.checkpoint_every_n_steps={SAVE_AT}")), caption_root)
    return caption_root / "outputs" / "texts_w2"


def test_two_ranks_train_and_the_terms_sum_to_the_loss(two_ranks):
    steps = [r for r in records(two_ranks) if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, SAVE_AT + 1))
    for r in steps:
        terms = {k.removeprefix("train/loss_"): v for k, v in r.items() if k.startswith("train/loss_")}
        assert terms.keys() == WEIGHTS.keys(), r
        assert all(math.isfinite(v) and v > 0 for v in terms.values()), r
        weighted = sum(WEIGHTS[t] * v for t, v in terms.items())
        assert weighted == pytest.approx(r["train/loss"], rel=1e-6), (weighted, r)
    # It trains: the shared temperature moved off its init, and the loss is not a constant.
    assert steps[-1]["train/logit_scale"] != pytest.approx(1 / 0.07, rel=1e-6)
    assert len({r["train/loss"] for r in steps}) == len(steps)
    assert (two_ranks / "checkpoints" / "latest").read_text().strip() == f"step_{SAVE_AT:08d}"


def test_texts_and_samples_across_a_resize(caption_root, two_ranks):
    """2 ranks -> 1 rank: every sample of epochs 0 and 1 read once, and each (sample, epoch) chose
    the same texts on 2 ranks, on 1 rank, in an uninterrupted 1-rank run, and as recomputed."""
    started = epoch_keys(two_ranks)
    assert set(started) == {0, 1}   # the checkpoint cuts epoch 0 and epoch 1
    resized = caption_root / "outputs" / "texts_w1"
    shutil.copytree(two_ranks, resized)
    more = ["trainer.resume=latest", f"trainer.max_steps={FINAL}", "trainer.checkpoint_every_n_steps=100"]
    run_cli([sys.executable, *train_args(caption_root, resized.name, *more)], caption_root)
    counts = epoch_keys(resized)
    epoch_size = len(counts[0])
    assert 80 <= epoch_size <= 95   # write_digits_caption_shards' 5 % of 1797, in 6 shards
    for epoch in (0, 1):
        assert len(counts[epoch]) == epoch_size and set(counts[epoch].values()) == {1}, epoch
    assert all(set(c.values()) == {1} for c in counts.values()) and sum(map(len, counts.values())) == FINAL * 12

    straight = caption_root / "outputs" / "texts_straight_w1"
    run_cli([sys.executable, *train_args(caption_root, straight.name, f"trainer.max_steps={FINAL}",
                                         "trainer.checkpoint_every_n_steps=100")], caption_root)
    after_resize, uninterrupted = chosen_texts(resized), chosen_texts(straight)
    on_two_ranks = chosen_texts(two_ranks)
    common = after_resize.keys() & uninterrupted.keys()
    assert {e for _, e in common} >= {0, 1} and len(common) >= 2 * epoch_size
    assert {p: after_resize[p] for p in common} == {p: uninterrupted[p] for p in common}
    assert on_two_ranks.keys() <= common   # the 2-rank part, against a run that never had 2 ranks
    # The same sample chooses other sub-captions in another epoch (the epoch is in the RNG's seed).
    key = next(k for k, e in on_two_ranks if e == 0)
    assert after_resize[(key, 0)]["long"] != after_resize[(key, 2)]["long"]
    assert after_resize == recomputed(resized, after_resize)


# -- bad text data ---------------------------------------------------------------------------

# (reason as in metrics.jsonl, how to break a sample). The roles are read in order alt, full,
# long, neg: a bad long caption is reported by `full`, the first role that reads it.
BREAKS = [
    ("missing_text_full", lambda s: s["json"].pop("long_caption")),
    ("missing_text_full", lambda s: s.pop("json")),   # no .json member at all
    ("empty_text_full", lambda s: s["json"].update(long_caption="  ")),
    ("empty_text_full", lambda s: s["json"].update(long_caption=[])),
    ("text_full_not_a_string", lambda s: s["json"].update(long_caption=7)),
    ("text_full_not_a_string", lambda s: s["json"].update(long_caption=["A seven.", None])),
    ("json_not_utf-8", lambda s: s.update(json=b'{"long_caption": "a \xff seven"}')),
    ("json_invalid", lambda s: s.update(json=b'{"long_caption": ')),
    ("json_invalid", lambda s: s.update(json=b'["a list, not an object"]')),
    ("missing_text_alt", lambda s: s.pop("txt")),
    ("text_alt_not_utf-8", lambda s: s.update(txt=b"a handwritten \xfe seven")),
    ("empty_text_alt", lambda s: s.update(txt=b" \n")),
]
# Optional hard negatives that are absent or unusable: the sample trains, with no `neg` texts.
NO_NEGATIVES = [lambda s: s["json"].pop("negatives"), lambda s: s["json"].update(negatives=[5]),
                lambda s: s["json"].update(negatives=["", " "])]


def bad_shard(sources: list[Path], out: Path, usable: int) -> list[str]:
    """Writes `out` from the `sources` shards' samples (keys prefixed `bad`): first the broken ones
    of BREAKS, then `usable` usable ones, of which the first len(NO_NEGATIVES) lose their hard
    negatives. Returns the keys of those."""
    samples: dict[str, dict] = defaultdict(dict)
    for source in sources:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                stem, ext = member.name.split(".", 1)
                samples[f"bad{stem}"][ext] = tar.extractfile(member).read()
    plan = [fn for _, fn in BREAKS] + NO_NEGATIVES + [lambda s: None] * (usable - len(NO_NEGATIVES))
    assert len(samples) >= len(plan) and usable >= len(NO_NEGATIVES)
    with tarfile.open(out, "w") as tar:
        for (stem, sample), change in zip(samples.items(), plan):   # broken first: read before the usable ones
            sample["json"] = json.loads(sample["json"])
            change(sample)
            if isinstance(sample.get("json"), dict):
                sample["json"] = json.dumps(sample["json"]).encode()
            for ext, data in sample.items():
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return list(samples)[len(BREAKS):len(BREAKS) + len(NO_NEGATIVES)]


def test_bad_text_data_is_skipped_and_counted_by_reason(caption_root):
    """A copy of the 6 train shards plus a 7th with broken samples, trained for exactly one epoch
    (the usable samples fill whole batches; a batch reaching into epoch 1 would read, and count,
    the broken samples again): each reason counted once per broken sample, nothing else skipped."""
    folder = caption_root / "data" / "bad_captions"
    shutil.copytree(caption_root / "data" / "digits_captions" / "train", folder)
    good = json.loads((folder / "stats.json").read_text())["count"]
    usable = (-good) % GLOBAL_BATCH + (GLOBAL_BATCH if (-good) % GLOBAL_BATCH <= len(NO_NEGATIVES) else 0)
    no_negatives = bad_shard([folder / "00000.tar", folder / "00001.tar"], folder / "00006.tar", usable)
    steps = (good + usable) // GLOBAL_BATCH
    run_dir = caption_root / "outputs" / "bad_texts"
    run_cli([sys.executable, *train_args(caption_root, run_dir.name, f"trainer.max_steps={steps}",
                                         "data.streams_per_rank=1", urls="bad_captions/{00000..00006}")],
            caption_root)
    last = records(run_dir)[-1]
    assert last["step"] == steps and math.isfinite(last["train/loss"])
    skipped = {k.removeprefix("data/skipped/"): v for k, v in last.items() if k.startswith("data/skipped/")}
    assert {k: v for k, v in skipped.items() if v} == dict(Counter(reason for reason, _ in BREAKS)), skipped
    assert not any("neg" in reason for reason in skipped)   # the optional role has no skip reasons
    counts = epoch_keys(run_dir)
    assert set(counts) == {0} and len(counts[0]) == good + usable and set(counts[0].values()) == {1}
    chosen = chosen_texts(run_dir)
    bad_keys = {key: texts for (key, _), texts in chosen.items() if "/00006.tar#" in key}
    assert len(bad_keys) == usable
    for key, texts in bad_keys.items():
        has_negatives = key.rsplit("#", 1)[1] not in no_negatives
        assert (len(texts["neg"]) == 2) == has_negatives and texts["alt"] == [[0]] and texts["long"], (key, texts)


# -- the documented command-line form of loss.terms ------------------------------------------------

@pytest.mark.parametrize("loss, terms", [
    ("multi_text", {"alt": {"texts": "alt"}, "long": {"texts": "long", "weight": 1.0}}),   # multi_text.py's DreamLIP
    ("multi_text", {"alt": {"texts": "alt", "negatives": "neg", "negative_scope": "own"}}),   # its NegCLIP example
])
def test_the_documented_terms_override_replaces_the_default(loss, terms):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from clipkit.config import CONF_DIR

    override = "loss.terms={" + ", ".join(
        f"{name}: {{{', '.join(f'{k}: {v}' for k, v in spec.items())}}}" for name, spec in terms.items()) + "}"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("train", overrides=["data=digits_captions", f"loss={loss}", override])
        except ConfigCompositionException as err:
            pytest.fail(f"{override}: {err}")
    assert OmegaConf.to_container(cfg.loss.terms) == terms


def test_null_terms_become_one_term_per_positive_role():
    """loss=multi_text as shipped (terms: null) on data with roles: one weight-1 term per role that
    is not a hard negative (data=digits_captions: alt, full, long; not neg)."""
    from hydra import compose, initialize_config_dir

    from clipkit.config import CONF_DIR
    from clipkit.recipe import build_loss, build_towers

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=digits_captions", "loss=multi_text", "model.context_length=64"])
    assert cfg.loss.terms is None
    loss = build_loss(cfg.loss, build_towers(cfg.model), positive_roles=("alt", "full", "long"))
    assert {name: (t["texts"], t["weight"], t["negatives"]) for name, t in loss.terms.items()} == {
        "alt": ("alt", 1.0, None), "full": ("full", 1.0, None), "long": ("long", 1.0, None)}
