"""Long text context (`model.context_length`, `model.pos_stretch`): Long-CLIP's stretch value by
value against its own loop, the model/mask/tokenizer agreement, the trimmed text tower at 248,
the frozen kept rows under the real DeepSpeed engine, the open_clip export and the resume."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.model import resize_text_pos_embed

from clipkit.errors import ClipkitConfigError
from clipkit.models import build_model
from clipkit.models.outputs import encode_text_pooled, trimmable_text_length
from clipkit.models.positions import (
    check_text_length,
    frozen_position_count,
    join_kept_positions,
    longclip_stretch,
    stretched_positions,
    uniform_resize,
)
from clipkit.schema import PosStretchConfig

NAME = "clipkit-test-long-context"
# A tiny CLIP with CLIP's own 77-position text context (the tokenizer's vocabulary), on the CPU.
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CAPTIONS = ["a photo of the digit 3", "7", "zero", "the number five " * 30]   # the last one passes 77 tokens


def their_loop(pre: torch.Tensor) -> torch.Tensor:
    """beichenzbc/Long-CLIP model/longclip.py::load_from_clip, the stretch as written there
    (`positional_embedding_pre` shortened to `pre`, the last four rows as a loop over k)."""
    length, dim = pre.shape
    keep_len = 20
    new = torch.zeros([4 * length - 3 * keep_len, dim], dtype=pre.dtype)
    for i in range(keep_len):
        new[i] = pre[i]
    for i in range(length - 1 - keep_len):
        new[4 * i + keep_len] = pre[i + keep_len]
        new[4 * i + 1 + keep_len] = 3 * pre[i + keep_len] / 4 + 1 * pre[i + 1 + keep_len] / 4
        new[4 * i + 2 + keep_len] = 2 * pre[i + keep_len] / 4 + 2 * pre[i + 1 + keep_len] / 4
        new[4 * i + 3 + keep_len] = 1 * pre[i + keep_len] / 4 + 3 * pre[i + 1 + keep_len] / 4
    for k in range(4):
        new[4 * length - 3 * keep_len - 4 + k] = pre[length - 1] + k * (
            pre[length - 1] - pre[length - 2]) / 4
    return new


def general_rule(pe: torch.Tensor, keep: int, ratio: float) -> torch.Tensor:
    """The rule row by row in float64: c = keep + (p − keep)/ratio, interpolated or extrapolated."""
    length = pe.shape[0]
    pe = pe.double()
    rows = []
    for p in range(round(keep + ratio * (length - keep))):
        c = p if p < keep else keep + (p - keep) / ratio
        i = min(int(c), length - 2)
        rows.append(pe[i] + (c - i) * (pe[i + 1] - pe[i]))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_longclip_stretch_is_their_loop_bit_for_bit(dtype):
    pe = torch.randn(77, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = longclip_stretch(pe, keep=20, ratio=4)
    assert got.shape == (248, 24) and got.dtype == dtype
    assert torch.equal(got, their_loop(pe))
    assert torch.equal(got[:20], pe[:20]) and torch.equal(got[20::4][:57], pe[20:])   # every 4th row is a source row


@pytest.mark.parametrize(("keep", "ratio"), [(20, 4), (10, 3), (0, 2), (5, 2.5), (30, 1)])
def test_longclip_stretch_follows_the_general_rule(keep, ratio):
    pe = torch.randn(77 if keep != 5 else 75, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = longclip_stretch(pe, keep=keep, ratio=ratio)
    assert got.shape[0] == keep + ratio * (pe.shape[0] - keep)
    torch.testing.assert_close(got, general_rule(pe, keep, ratio), rtol=0, atol=1e-12)
    if ratio == 1:
        assert torch.equal(got, pe)


def test_uniform_is_open_clip_resize_text_pos_embed():
    pe = torch.randn(77, 8, generator=torch.Generator().manual_seed(2))
    state = {"positional_embedding": pe.clone()}
    target = torch.nn.Module()
    target.positional_embedding = torch.nn.Parameter(torch.zeros(248, 8))   # open_clip reads only its shape
    resize_text_pos_embed(state, target)
    assert torch.equal(uniform_resize(pe, 248), state["positional_embedding"])


def test_config_mistakes_are_one_line_errors():
    pe = torch.zeros(77, 4)
    with pytest.raises(ClipkitConfigError, match=r"model.context_length=200.*set model.context_length=248"):
        stretched_positions(pe, 200, mode="longclip", keep=20, ratio=4)
    assert stretched_positions(pe, 134, mode="longclip", keep=20, ratio=None).shape == (134, 4)  # ratio 2
    with pytest.raises(ClipkitConfigError, match="mode=.bilinear. is not one of longclip, uniform"):
        stretched_positions(pe, 248, mode="bilinear", keep=20, ratio=4)
    with pytest.raises(ClipkitConfigError, match="keep=76 must be in"):
        longclip_stretch(pe, keep=76, ratio=4)
    with pytest.raises(ClipkitConfigError, match="use model.pos_stretch.mode=uniform"):
        stretched_positions(pe, 50, mode="longclip", keep=20, ratio=None)
    with pytest.raises(ClipkitConfigError, match="data.texts.long.context_length=300 exceeds .* 248"):
        check_text_length(300, 248, "data.texts.long.context_length")


@pytest.fixture(scope="module")
def pretrained_77(tmp_path_factory):
    """A 77-position open_clip checkpoint of the tiny CLIP (as open_clip saves state dicts)."""
    bundle = build_model(NAME, config=CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    path = tmp_path_factory.mktemp("pretrained") / "clip77.bin"
    torch.save(model.state_dict(), path)
    assert bundle.model.context_length == 77
    return path, model.positional_embedding.detach().clone()


def test_a_77_position_checkpoint_is_stretched_and_everything_says_248(pretrained_77):
    path, pe77 = pretrained_77
    bundle = build_model(NAME, config=CONFIG, pretrained=str(path), context_length=248)
    model = bundle.model
    assert model.context_length == 248 and model.attn_mask.shape == (248, 248)
    assert torch.equal(model.attn_mask, torch.full((248, 248), float("-inf")).triu(1))
    assert bundle.model_cfg["text_cfg"]["context_length"] == 248
    assert open_clip.get_model_config(NAME)["text_cfg"]["context_length"] == 77   # the registry is not touched
    tokens = bundle.tokenizer(CAPTIONS)
    assert tokens.shape == (4, 248) and int((tokens[3] != 0).sum()) > 77
    assert torch.equal(model.positional_embedding, longclip_stretch(pe77))
    # Long-CLIP's freeze: 20 frozen rows, 228 trained ones, nothing else changed.
    assert frozen_position_count(model) == 20
    params = dict(model.named_parameters())
    assert not params["parametrizations.positional_embedding.0.kept"].requires_grad
    assert params["parametrizations.positional_embedding.original"].shape == (228, 32)
    joined = join_kept_positions(model.state_dict())
    assert torch.equal(joined["positional_embedding"], longclip_stretch(pe77))
    assert not any("parametrizations" in key for key in joined)


def test_uniform_stretch_and_random_init_and_a_248_file(pretrained_77, tmp_path):
    path, pe77 = pretrained_77
    uniform = build_model(NAME, config=CONFIG, pretrained=str(path), context_length=248,
                          pos_stretch=PosStretchConfig(mode="uniform"))
    assert frozen_position_count(uniform.model) == 0
    assert torch.equal(uniform.model.positional_embedding, uniform_resize(pe77, 248))
    with pytest.raises(ClipkitConfigError, match="freeze_kept=true needs mode=longclip"):
        build_model(NAME, config=CONFIG, pretrained=str(path), context_length=248,
                    pos_stretch=PosStretchConfig(mode="uniform", freeze_kept=True))
    fresh = build_model(NAME, config=CONFIG, context_length=248).model   # random init: just 248 positions
    assert fresh.positional_embedding.shape == (248, 32) and frozen_position_count(fresh) == 0
    assert 0.005 < float(fresh.positional_embedding.detach().std()) < 0.015 and fresh.attn_mask.shape == (248, 248)
    # A 248-position file (an export of a Long-CLIP run) loads as it is into 248, and not silently into 77.
    long_file = tmp_path / "clip248.bin"
    state = open_clip.create_model(NAME).state_dict()
    state["positional_embedding"] = uniform.model.positional_embedding.detach().clone()
    torch.save(state, long_file)
    again = build_model(NAME, config=CONFIG, pretrained=str(long_file), context_length=248).model
    assert torch.equal(again.positional_embedding, state["positional_embedding"])
    with pytest.raises(ClipkitConfigError, match="has 248 text positions.*set model.context_length=248"):
        build_model(NAME, config=CONFIG, pretrained=str(long_file))


def _values_and_grads(model, fn, tokens):
    model.zero_grad()
    out = fn(model, tokens)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_trimmed_text_tower_is_exact_at_248_and_for_77_token_texts(pretrained_77):
    path, _ = pretrained_77
    bundle = build_model(NAME, config=CONFIG, pretrained=str(path), context_length=248)
    model = bundle.model.double()
    tokens = bundle.tokenizer(CAPTIONS)
    assert 77 < trimmable_text_length(model, tokens) < 248
    want, want_grads = _values_and_grads(model, lambda m, t: m.encode_text(t), tokens)
    got, got_grads = _values_and_grads(model, encode_text_pooled, tokens)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got_grads.keys() == want_grads.keys() and "parametrizations.positional_embedding.original" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-10, atol=1e-12, msg=name)
    # A role tokenized at 77 on the 248-position tower: the first 77 positions, as if padded to 248.
    short = open_clip.get_tokenizer(NAME, context_length=77)(CAPTIONS[:3])
    padded = torch.nn.functional.pad(short, (0, 248 - 77))
    torch.testing.assert_close(encode_text_pooled(model, short), model.encode_text(padded), rtol=1e-12, atol=1e-12)


# ---- the real DeepSpeed engine: freezing, checkpoint, export, resume (gloo, one process) ----

STAGES = [0, 2, 3]
BF16_STAGES = [0, 2]


def _objective(path):
    from clipkit.losses import ClipLoss
    from clipkit.objective import ContrastiveObjective

    torch.manual_seed(0)
    bundle = build_model(NAME, config=CONFIG, pretrained=str(path), context_length=248)
    return bundle, ContrastiveObjective(bundle.model, ClipLoss())


def _engine(objective, stage, precision="fp32"):
    from clipkit.engine import build_optimizer, initialize_engine, render_deepspeed_config

    # A large lr and weight decay: decay alone would move every row it reached.
    optimizer = build_optimizer(objective, lr=1e-2, weight_decay=0.5, betas=(0.9, 0.98), eps=1e-6)
    ds = render_deepspeed_config(global_batch_size=4, world_size=1, zero_stage=stage, precision=precision,
                                 grad_clip=1.0)
    return initialize_engine(objective, optimizer, None, ds)


def _full_positions(engine) -> torch.Tensor:
    import deepspeed

    from clipkit.engine import fp32_master

    text = engine.module.model
    kept = text.parametrizations.positional_embedding[0].kept
    trained = text.parametrizations.positional_embedding.original
    with torch.no_grad(), deepspeed.zero.GatheredParameters([kept]):
        kept = kept.detach().clone()
    return torch.cat([kept, fp32_master(engine, trained).detach().clone()])


def _engine_worker(rank, port, pretrained, root, out_path):
    import os

    import deepspeed

    from clipkit.checkpoint import Checkpointer, export_open_clip

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    for stage in STAGES:
        bundle, objective = _objective(pretrained)
        tokens = bundle.tokenizer(CAPTIONS)
        engine = _engine(objective, stage)
        before = _full_positions(engine)
        for _ in range(3):
            loss, _ = engine(images, tokens)
            engine.backward(loss)
            engine.step()
        after = _full_positions(engine)
        run = root / f"zero{stage}"
        run.mkdir()
        (run / "open_clip_config.json").write_text(json.dumps({"model_cfg": bundle.model_cfg}))
        ckpt = Checkpointer(run / "checkpoints")
        ckpt.save(engine, 3, {})
        engine.eval()
        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            features = engine.module.model.encode_text(tokens).detach().clone()
        engine.destroy()
        # Resume into a fresh build of the same config: the same 248 positions come back.
        _, fresh = _objective(pretrained)
        resumed = _engine(fresh, stage)
        ckpt.load(resumed, "step_00000003")
        results[stage] = {"before": before, "after": after, "resumed": _full_positions(resumed), "features": features,
                          "export": str(export_open_clip(run))}
        resumed.destroy()
    for stage in BF16_STAGES:   # frozen parameters stay bf16 copies; they must not move either
        bundle, objective = _objective(pretrained)
        engine = _engine(objective, stage, "bf16")
        before = _full_positions(engine)
        for _ in range(3):
            loss, _ = engine(images, bundle.tokenizer(CAPTIONS))
            engine.backward(loss)
            engine.step()
        results[("bf16", stage)] = {"before": before, "after": _full_positions(engine)}
        engine.destroy()
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def engine_results(pretrained_77, tmp_path_factory):
    import torch.multiprocessing as mp
    from conftest import free_port

    root = tmp_path_factory.mktemp("engine")
    out = root / "results.pt"
    mp.spawn(_engine_worker, args=(free_port(), pretrained_77[0], root, str(out)), nprocs=1, join=True)
    return torch.load(out)


@pytest.mark.parametrize("stage", STAGES)
def test_kept_rows_stay_bit_identical_under_adamw_decay_and_zero(engine_results, stage):
    before, after = engine_results[stage]["before"], engine_results[stage]["after"]
    assert before.shape == after.shape == (248, 32)
    assert torch.equal(after[:20], before[:20])
    moved = (after[20:] != before[20:]).any(dim=1)
    assert bool(moved.all()), f"{int((~moved).sum())} trained rows did not move"
    assert torch.equal(engine_results[stage]["resumed"], after)


@pytest.mark.parametrize("stage", BF16_STAGES)
def test_kept_rows_stay_bit_identical_in_bf16(engine_results, stage):
    before, after = engine_results[("bf16", stage)]["before"], engine_results[("bf16", stage)]["after"]
    assert torch.equal(after[:20], before[:20])
    assert bool((after[20:].float() != before[20:].float()).any(dim=1).all())


@pytest.mark.parametrize("stage", STAGES)
def test_the_export_is_one_248_position_tensor_open_clip_loads_with_the_same_text_features(engine_results, stage):
    export = engine_results[stage]["export"]
    config = json.loads(open(export.replace("open_clip_pytorch_model.bin", "open_clip_config.json")).read())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 248
    state = torch.load(export, weights_only=True)
    assert state["positional_embedding"].shape == (248, 32) and not any("parametrizations" in k for k in state)
    assert torch.equal(state["positional_embedding"], engine_results[stage]["after"])
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + export.rsplit("/", 1)[0])
    assert model.context_length == 248
    tokenizer = open_clip.get_tokenizer("local-dir:" + export.rsplit("/", 1)[0])
    tokens = tokenizer(CAPTIONS)
    assert tokens.shape == (4, 248)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_text(tokens), engine_results[stage]["features"],
                                   rtol=1e-5, atol=1e-5)


def test_pos_stretch_is_checked_against_its_schema():
    from clipkit.schema import load_section

    assert load_section(PosStretchConfig, {"mode": "uniform"}, "model.pos_stretch") == \
        PosStretchConfig(mode="uniform", keep=20, ratio=4.0, freeze_kept=None)
    with pytest.raises(ClipkitConfigError, match="model.pos_stretch.kep is not a key.*did you mean model.pos_stretch.keep"):
        load_section(PosStretchConfig, {"kep": 10}, "model.pos_stretch")


def test_lit_text_lock_covers_the_trained_positions(pretrained_77):
    from clipkit.models import lock_towers
    from clipkit.models.positions import trained_positions
    from clipkit.schema import LockTextConfig

    for unlocked, trainable in ((0, False), (4, True)):   # 4 groups: embeddings, block 0, block 1 + ln, projection
        model = build_model(NAME, config=CONFIG, pretrained=str(pretrained_77[0]), context_length=248).model
        lock_towers(model, image=None, text=LockTextConfig(unlocked_layers=unlocked))
        assert trained_positions(model).requires_grad is trainable is model.token_embedding.weight.requires_grad
