"""CoCa, FILIP, LiT, FLIP patch dropout, TailDrop and distillation, each checked against its
definition on real (tiny, random-init) open_clip towers."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from clipkit.config import CONF_DIR
from clipkit.engine import build_optimizer, initialize_engine, render_deepspeed_config
from clipkit.errors import ClipkitConfigError
from clipkit.losses import ClipLoss, FilipLoss
from clipkit.losses.functional import caption_loss
from clipkit.models.outputs import tail_drop
from clipkit.objective import ContrastiveObjective, Teacher
from clipkit.recipe import build_loss, build_objective, build_towers


def model_cfg(option: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={option}", *overrides]).model


def batch(bundle, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = bundle.tokenizer([f"a photo of the digit {i}" for i in range(n)])
    return images, tokens


def test_coca_caption_ce_at_init_is_ln_vocab():
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_coca"))
    images, tokens = batch(bundle, 8)
    with torch.no_grad():
        out = bundle.model(images, tokens)
    ce = float(caption_loss(out["logits"], out["labels"], pad_id=0))
    vocab = out["logits"].shape[-1]
    assert vocab == 49408
    assert abs(ce - math.log(vocab)) < 0.01 * math.log(vocab), ce  # near-uniform logits at init


def test_coca_decoder_is_causal():
    """Changing token k leaves every caption logit before position k unchanged."""
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_coca"))
    bundle.model.eval()
    images, tokens = batch(bundle, 2)
    changed = tokens.clone()
    k = 4
    changed[:, k] = 1234
    with torch.no_grad():
        a, b = bundle.model(images, tokens)["logits"], bundle.model(images, changed)["logits"]
    # logits[:, j] predicts token j + 1 from tokens 0..j.
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=0)
    assert not torch.allclose(a[:, k:], b[:, k:])


def test_filip_token_features_and_masks():
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_filip"))
    objective = ContrastiveObjective(bundle.model, FilipLoss())
    images, tokens = batch(bundle)
    out = objective.outputs({"image": images, "text": tokens}, FilipLoss.needs)
    assert out["image_tokens"].shape == (4, 16, 64)  # 32 px / patch 8 = 16 patches, CLS excluded
    assert out["image_mask"] is None
    assert out["text_tokens"].shape == (4, 16, 64) and torch.equal(out["text_mask"], tokens != 0)
    torch.testing.assert_close(out["text_tokens"].norm(dim=-1), torch.ones(4, 16))
    loss, _ = objective({"image": images, "text": tokens})
    assert torch.isfinite(loss)


def _lit_worker(rank, port, out_path):
    """One real DeepSpeed engine (gloo, world 1) stepping a LiT objective; results to a file."""
    import os

    import deepspeed

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_lit"))
    objective = ContrastiveObjective(bundle.model, ClipLoss())
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    optimizer = build_optimizer(objective, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    # ZeRO 0 keeps the client optimizer's own param groups and per-parameter state, so both can be
    # checked by name (ZeRO 1+ swaps them for flat partitions).
    ds = render_deepspeed_config(global_batch_size=4, world_size=1, zero_stage=0, precision="fp32", grad_clip=1.0)
    engine = initialize_engine(objective, optimizer, None, ds)
    for step in range(3):
        images, tokens = batch(bundle, seed=step)
        loss, _ = engine({"image": images, "text": tokens})
        engine.backward(loss)
        engine.step()
    names = {id(p): n for n, p in engine.module.named_parameters()}
    in_optimizer = {names[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in names}
    with_state = {names[id(p)] for p in optimizer.state if id(p) in names}
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    torch.save((before, after, trainable, in_optimizer, with_state), out_path)


def test_lit_locked_tower_is_bitwise_unchanged_and_has_no_optimizer_state(tmp_path):
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_lit_worker, args=(free_port(), str(tmp_path / "lit.pt")), nprocs=1, join=True)
    before, after, trainable, in_optimizer, with_state = torch.load(tmp_path / "lit.pt")
    locked = {n for n in before if n.startswith("model.visual.")}
    assert locked and not locked & trainable
    for name in locked:
        assert torch.equal(after[name], before[name]), name
    assert in_optimizer == with_state == trainable  # every trainable tensor has Adam state, no locked one does
    assert not torch.equal(after["model.token_embedding.weight"], before["model.token_embedding.weight"])


def test_lit_can_keep_the_last_groups_unlocked():
    bundle = build_towers(model_cfg("tiny_lit", "model.lock_image.unlocked_groups=1"))
    visual = dict(bundle.model.visual.named_parameters())
    assert not visual["conv1.weight"].requires_grad and visual["proj"].requires_grad


def test_patch_dropout_keeps_cls_and_the_flip_token_count():
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_flip"))
    visual = bundle.model.visual
    images, _ = batch(bundle)
    visual.train()
    kept = visual._embeds(images).shape[1]
    assert kept == 1 + int(16 * (1 - 0.5))
    plain = build_towers(model_cfg("tiny_vit"))
    plain.model.visual.load_state_dict(visual.state_dict())
    visual.eval(), plain.model.visual.eval()
    with torch.no_grad():  # eval mode: bitwise the plain tower
        assert torch.equal(visual(images), plain.model.visual(images))
    zero = build_towers(model_cfg("tiny_flip", "model.patch_dropout=0.0"))
    zero.model.visual.load_state_dict(plain.model.visual.state_dict())
    zero.model.visual.train(), plain.model.visual.train()
    with torch.no_grad():  # p = 0 in train mode: bitwise the plain tower
        assert torch.equal(zero.model.visual(images), plain.model.visual(images))


def test_unmasked_tuning_phase_turns_patch_dropout_off():
    bundle = build_towers(model_cfg("tiny_flip"))
    objective = build_objective(model_cfg("tiny_flip"), bundle, ClipLoss(), max_steps=100, seed=0)
    objective.on_step(50)
    assert bundle.model.visual.patch_dropout.prob == 0.5
    objective.on_step(51)  # the last 50 of 100 steps are unmasked
    assert bundle.model.visual.patch_dropout.prob == 0.0


def test_tail_drop_zero_is_identity_and_dropped_tokens_get_no_gradient():
    x = torch.randn(2, 17, 8, requires_grad=True)
    assert tail_drop(x, 0) is x
    kept = tail_drop(x, 5)
    assert kept.shape == (2, 12, 8)
    kept.sum().backward()
    assert float(x.grad[:, 12:].abs().max()) == 0.0 and float(x.grad[:, :12].abs().min()) == 1.0


def test_tail_drop_k_is_per_step_seeded_and_off_in_eval():
    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_taildrop"))
    objective = build_objective(model_cfg("tiny_taildrop"), bundle, FilipLoss(), max_steps=10, seed=3)
    ks = []
    for step in range(1, 30):
        objective.on_step(step)
        ks.append(objective.drop_last)
    assert set(ks) <= set(range(7)) and len(set(ks)) > 3
    objective.on_step(7)
    k = objective.drop_last
    other = build_objective(model_cfg("tiny_taildrop"), bundle, FilipLoss(), max_steps=10, seed=3)
    other.on_step(7)
    assert other.drop_last == k  # what every rank (and a resumed run) draws for step 7
    images, tokens = batch(bundle)
    objective.train()
    assert objective.encode_image_tokens(images).shape[1] == 16 - k
    objective.eval()
    assert objective.encode_image_tokens(images).shape[1] == 16


def test_tail_drop_acts_before_the_coca_pooler():
    """`model.tail_drop_max` on CoCa: the attentional pooler (and so the caption decoder and the
    contrastive embedding) sees 16 − k patch tokens; k = 0 is the plain model, dropped tokens get
    no gradient."""
    from clipkit.losses import CocaLoss

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=coca_digits", "model.tail_drop_max=4"])
    torch.manual_seed(0)
    bundle = build_towers(cfg.model)
    objective = build_objective(cfg.model, bundle, CocaLoss(), max_steps=10, seed=0)
    assert objective.tail_drop_max == 4
    images, tokens = batch(bundle)
    seen = []

    def keep_grad(module, inputs, out):  # returns None: the output is left as it is
        if out.requires_grad:
            out.retain_grad()
        seen.append(out)

    bundle.model.visual.transformer.register_forward_hook(keep_grad)
    objective.train()
    objective.drop_last = 0
    plain = ContrastiveObjective(bundle.model, objective.loss).train()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(objective({"image": images, "text": tokens})[:1],
                                                       plain({"image": images, "text": tokens})[:1]))
    seen.clear()
    objective.drop_last = 3
    loss, _ = objective({"image": images, "text": tokens})
    loss.backward()
    grad = seen[0].grad  # [b, 1 + 16, w] transformer outputs
    assert float(grad[:, -3:].abs().max()) == 0.0 and float(grad[:, :-3].abs().amax(dim=(0, 2)).min()) > 0


def _distill_kl_and_grads(bundle, teacher_model):
    """KL(teacher || student) of one batch and the student's largest gradient entry."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loss = build_loss(compose("train", overrides=["loss=distill", "loss.init_logit_scale=20.0"]).loss, bundle)
    objective = ContrastiveObjective(bundle.model, loss, teacher=Teacher(teacher_model))
    objective.eval()  # deterministic towers on both sides
    objective.zero_grad(set_to_none=True)
    images, tokens = batch(bundle)
    out = objective.outputs({"image": images, "text": tokens}, loss.needs)
    kl = loss.kl(out["image"], out["text"], out["teacher_image"], out["teacher_text"], out["teacher_logit_scale"])
    kl.backward()
    grads = [p.grad for p in objective.parameters() if p.grad is not None]
    assert grads
    assert not any(n.startswith("_teacher") for n, _ in objective.named_parameters())  # not checkpointed
    return float(kl.detach()), max(float(g.abs().max()) for g in grads)


def test_student_equal_to_teacher_gives_zero_distill_gradient():
    import copy

    torch.manual_seed(0)
    bundle = build_towers(model_cfg("tiny_vit"))
    teacher_model = copy.deepcopy(bundle.model)
    teacher_model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    other_teacher = copy.deepcopy(teacher_model)
    with torch.no_grad():
        other_teacher.visual.proj.add_(0.05 * torch.randn_like(other_teacher.visual.proj))
    kl, grad = _distill_kl_and_grads(bundle, teacher_model)
    kl_other, grad_other = _distill_kl_and_grads(bundle, other_teacher)
    assert not any(p.requires_grad for p in teacher_model.parameters())
    assert abs(kl) < 1e-6 and kl_other > 1e-4
    # Zero up to float32 rounding of the towers (~1e-6 here), against ~1e-2 for a teacher that differs.
    assert grad < 1e-5 and grad < 1e-3 * grad_other, (grad, grad_other)


@pytest.mark.parametrize("model,loss,message", [
    ("tiny_vit", "coca", "CoCa model"),
    ("tiny_coca", "filip", "without an attentional pooler"),
    ("tiny_vit", "distill", "model.teacher"),
])
def test_a_loss_the_model_cannot_feed_is_a_config_error(model, loss, message):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"loss={loss}"])
    bundle = build_towers(cfg.model)
    with pytest.raises(ClipkitConfigError, match=message):
        build_objective(cfg.model.copy() if model != "tiny_vit" else cfg.model, bundle, build_loss(cfg.loss, bundle),
                        max_steps=10, seed=0)
