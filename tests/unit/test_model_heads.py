"""Decoupled image heads (`model.heads`): a model without them is the model from before they
existed (state keys and a 20-step loss curve, against a recording), each head's export is a plain
open_clip model with the same embeddings, the two-head objective equals a float64 reference
written from the formulas (values and every gradient, temperatures too), and config mistakes are
one line.

    python tests/unit/test_model_heads.py --record   # rewrites tests/unit/data/one_head_curve.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clipkit.config import CONF_DIR
from clipkit.errors import ClipkitConfigError

CURVE = Path(__file__).parent / "data" / "one_head_curve.json"
CAPTIONS = ["a photo of a zero", "a thin slanted seven near the top", "one", "a bold eight, centred, bright",
            "two", "a small three on the left", "four", "a faint nine"]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=["model=tiny_vit", *overrides])


def one_head_curve(steps: int = 20) -> dict:
    """The tiny CLIP built by the recipe (no `model.heads`), loss=clip, 20 AdamW steps on a fixed
    batch: its state keys and its loss after each step. Uses only APIs that predate the heads."""
    from clipkit.engine import build_optimizer
    from clipkit.recipe import build_loss, build_objective, build_towers, seed_everything

    cfg = composed("loss=clip")
    seed_everything(0)
    bundle = build_towers(cfg.model)
    loss = build_loss(cfg.loss, bundle)
    objective = build_objective(cfg.model, bundle, loss, max_steps=steps, seed=0, loss_name="clip")
    optimizer = build_optimizer(objective, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(8, 3, 32, 32, generator=g), "text": bundle.tokenizer(CAPTIONS)}
    losses = []
    for _ in range(steps):
        value, _ = objective(batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "state_keys": list(objective.state_dict()), "losses": [float.hex(x) for x in losses]}


def test_a_model_without_heads_is_the_model_from_before_heads():
    """The recording was made by `one_head_curve` at the commit before `model.heads` existed
    (commit a1f91ad): same keys, and the same 20 losses bit for bit where the CPU
    runs the same kernels (torch's dispatch level); within float32 rounding elsewhere."""
    recorded, now = json.loads(CURVE.read_text()), one_head_curve()
    assert now["state_keys"] == recorded["state_keys"]
    ours, theirs = [float.fromhex(x) for x in now["losses"]], [float.fromhex(x) for x in recorded["losses"]]
    if (now["cpu_capability"], now["torch"]) == (recorded["cpu_capability"], recorded["torch"]):
        assert ours == theirs
    else:
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_heads_null_builds_no_module_and_draws_no_random_number():
    from clipkit.models.heads import head_names
    from clipkit.recipe import build_towers

    torch.manual_seed(0)
    model = build_towers(composed().model).model
    after = torch.rand(1)
    assert not hasattr(model, "heads") and head_names(model) == ("semantic",)
    torch.manual_seed(0)
    build_towers(composed("model.heads=null").model)
    assert torch.equal(torch.rand(1), after)


# ---- two heads: the objective, the export, the reference ----

def two_head_bundle(pool: str = "attn", text_projection: str = "own", dtype=torch.float32):
    from clipkit.recipe import build_towers

    torch.manual_seed(0)
    head = f"{{perceptual: {{pool: {pool}, attn_heads: 4, text_projection: {text_projection}}}}}"
    bundle = build_towers(composed(f"model.heads={head}").model)
    bundle.model.to(dtype)
    return bundle


@pytest.mark.parametrize("pool", ["attn", "avg", "tok"])
@pytest.mark.parametrize("text_projection", ["own", "shared"])
def test_each_head_exports_as_a_plain_open_clip_model_with_the_same_embeddings(pool, text_projection, tmp_path):
    from clipkit.checkpoint import to_open_clip_state_dict
    from clipkit.models.factory import open_clip_state_shapes
    from clipkit.models.heads import head_model_config, parse_heads
    from clipkit.objective import ContrastiveObjective

    bundle = two_head_bundle(pool, text_projection)
    objective = ContrastiveObjective(bundle.model, None).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = bundle.tokenizer(CAPTIONS[:4])
    state = {f"model.{k}": v for k, v in bundle.model.state_dict().items()}
    state["loss.temperature.logit_scale"] = torch.tensor([math.log(1 / 0.07)])
    state["loss.head_temperatures.perceptual.logit_scale"] = torch.tensor([math.log(20.0)])
    (spec,) = parse_heads({"perceptual": {"pool": pool, "attn_heads": 4, "text_projection": text_projection}})
    for head, cfg in (("semantic", bundle.model_cfg), ("perceptual", head_model_config(bundle.model_cfg, spec))):
        exported = to_open_clip_state_dict(state, head)
        assert {k: tuple(v.shape) for k, v in exported.items()} == open_clip_state_shapes(cfg)
        (tmp_path / head).mkdir()
        (tmp_path / head / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        torch.save(exported, tmp_path / head / "open_clip_pytorch_model.bin")
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / head}")
        model.eval()
        with torch.no_grad():
            theirs_image = F.normalize(model.encode_image(images), dim=-1)
            theirs_text = F.normalize(model.encode_text(tokens), dim=-1)
            ours_image, ours_text = objective.encode_image(images, head), objective.encode_text(tokens, head)
        torch.testing.assert_close(ours_image, theirs_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours_text, theirs_text, atol=1e-5, rtol=0)
        if head == "perceptual":
            assert float(model.logit_scale.detach()) == pytest.approx(math.log(20.0))
    if pool != "tok":   # the heads pool differently: their embeddings differ
        assert not torch.allclose(objective.encode_image(images), objective.encode_image(images, "perceptual"))


def reference_loss(model, batch, terms, temperatures, form):
    """The two-head objective from the formulas, in float64, with plain ops: the trunk as open_clip
    runs it, each head's pooling written out, each term the float64 multi-positive reference."""
    from clipkit.losses import functional as ref

    visual = model.visual
    x = visual.transformer(visual._embeds(batch["image"].double()))
    semantic = visual.ln_post(x[:, 0]) @ visual.proj
    head = model.heads["perceptual"]
    if head.attn_pool is not None:
        pooled = head.ln_post(head.attn_pool(x))[:, 0]
    elif head.spec.pool == "avg":
        pooled = head.ln_post(x)[:, 1:].mean(dim=1)
    else:
        pooled = head.ln_post(x)[:, 0]
    images = {"semantic": F.normalize(semantic, dim=-1), "perceptual": F.normalize(pooled @ head.proj, dim=-1)}
    total = 0
    for term in terms.values():
        h = term["image"]
        tokens = batch[f"text_{term['texts']}"]
        b, k, length = tokens.shape
        flat = tokens.reshape(b * k, length)
        positions = model.ln_final(model.transformer(model.token_embedding(flat) + model.positional_embedding,
                                                     attn_mask=model.attn_mask))
        eot = positions[torch.arange(b * k), flat.argmax(dim=-1)]
        projection = model.text_projection if h == "semantic" or head.text_projection is None else head.text_projection
        texts = F.normalize(eot @ projection, dim=-1).reshape(b, k, -1)
        scale = temperatures[h].logit_scale.exp()
        valid = batch[f"text_{term['texts']}_valid"]
        if form == "softmax":
            value = ref.multi_positive_clip_loss(images[h], texts, valid, scale)
        else:
            value = ref.multi_positive_siglip_loss(images[h], texts, valid, scale, temperatures[h].logit_bias)
        total = total + term["weight"] * value
    return total


def role_batch(tokenizer, seed=3):
    g = torch.Generator().manual_seed(seed)
    alt = tokenizer(CAPTIONS).reshape(8, 1, -1)
    long = tokenizer([f"{c}, drawn {w}" for c in CAPTIONS for w in ("thick", "thin")]).reshape(8, 2, -1)
    valid = torch.rand(8, 2, generator=g) < 0.7
    valid[:, 0] = True
    return {"image": torch.randn(8, 3, 32, 32, generator=g), "text_alt": alt,
            "text_alt_valid": torch.ones(8, 1, dtype=torch.bool), "text_long": long, "text_long_valid": valid}


TERMS = {"alt": {"texts": "alt", "image": "semantic", "weight": 1.0},
         "long": {"texts": "long", "image": "perceptual", "weight": 0.5}}


def two_head_objective(form: str, pool: str, text_projection: str):
    """(bundle, loss, objective): the float64 two-head objective of TERMS, the semantic head's
    temperature 10 and the perceptual head's 4, so a mix-up of the two shows."""
    from clipkit.losses import MultiTextLoss
    from clipkit.objective import ContrastiveObjective

    bundle = two_head_bundle(pool, text_projection, torch.float64)
    loss = MultiTextLoss(TERMS, form=form, init_logit_scale=10.0, impl="chunked", chunk_size=3).double()
    with torch.no_grad():
        loss.head_temperatures["perceptual"].logit_scale.fill_(math.log(4.0))
    return bundle, loss, ContrastiveObjective(bundle.model, loss, text_roles=("alt", "long"))


@pytest.mark.parametrize("form", ["softmax", "sigmoid"])
@pytest.mark.parametrize("pool,text_projection", [("attn", "own"), ("avg", "shared"), ("tok", "own")])
def test_the_two_head_objective_equals_the_float64_reference(form, pool, text_projection):
    bundle, loss, objective = two_head_objective(form, pool, text_projection)
    batch = role_batch(bundle.tokenizer)
    ours, metrics = objective(batch)
    params = [p for p in objective.parameters() if p.requires_grad]
    ours_grads = torch.autograd.grad(ours, params, allow_unused=True)
    temperatures = {"semantic": loss.temperature, "perceptual": loss.head_temperatures["perceptual"]}
    theirs = reference_loss(bundle.model, batch, loss.terms, temperatures, form)
    theirs_grads = torch.autograd.grad(theirs, params, allow_unused=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    names = [n for n, p in objective.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, ours_grads, theirs_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=name)
    assert metrics["logit_scale"].item() == pytest.approx(10.0) and metrics["logit_scale_perceptual"].item() == 4.0
    grad = dict(zip(names, ours_grads))
    for key in ("loss.temperature.logit_scale", "loss.head_temperatures.perceptual.logit_scale",
                "model.heads.perceptual.proj"):
        assert grad[key] is not None and bool(grad[key].abs().sum() > 0), key


def test_one_trunk_pass_serves_both_heads_and_the_semantic_head_is_the_towers_own():
    from clipkit.objective import ContrastiveObjective

    bundle = two_head_bundle()
    objective = ContrastiveObjective(bundle.model, None).eval()
    images = torch.randn(3, 3, 32, 32)
    calls = []
    handle = bundle.model.visual.transformer.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        both = objective.encode_image_heads(images, ("semantic", "perceptual"))
        assert len(calls) == 1
        torch.testing.assert_close(both["semantic"], F.normalize(bundle.model.encode_image(images), dim=-1),
                                   rtol=0, atol=0)
    handle.remove()


def test_config_mistakes_are_one_line():
    from clipkit.losses import MultiTextLoss
    from clipkit.models.heads import parse_heads
    from clipkit.objective import ContrastiveObjective
    from clipkit.recipe import build_towers

    for heads, words in [({"semantic": {}}, "always there"), ({"perceptual": {"pool": "max"}}, "pool='max'"),
                         ({"perceptual": {"text_projection": "both"}}, "own, shared"),
                         ({"perceptual": {"poool": "attn"}}, "poool is not a head key"),
                         ({"perceptual": {"attn_heads": 0}}, "positive integer")]:
        with pytest.raises(ClipkitConfigError, match=words):
            parse_heads(heads)
    with pytest.raises(ClipkitConfigError, match="does not divide the embedding width 64"):
        build_towers(composed("model.heads={perceptual: {attn_heads: 7}}").model)
    with pytest.raises(ClipkitConfigError, match="attentional pooler"):
        build_towers(composed("model=tiny_coca", "model.heads={perceptual: {}}").model)
    resnet = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    with pytest.raises(ClipkitConfigError, match="needs open_clip's ViT image tower .* ModifiedResNet"):
        build_towers(OmegaConf.merge(composed().model, {"name": "clipkit-tiny-rn", "config": resnet,
                                                        "heads": {"perceptual": {}}}))
    bundle = build_towers(composed().model)
    loss = MultiTextLoss({"long": {"texts": "long", "image": "perceptual"}})
    with pytest.raises(ClipkitConfigError, match=r"scores the image head\(s\) perceptual, which model=x does not "
                                                 r"have \(model.heads: none\)"):
        ContrastiveObjective(bundle.model, loss, text_roles=("long",)).check_outputs("multi_text", "x", loss.needs)
    with pytest.raises(ClipkitConfigError, match="must name an image head"):
        MultiTextLoss({"long": {"texts": "long", "image": 3}})
    from clipkit.losses import ClipLoss

    two = two_head_bundle()
    with pytest.raises(ClipkitConfigError, match=r"no term of loss=clip scores the image head\(s\) perceptual"):
        ContrastiveObjective(two.model, ClipLoss()).check_outputs("clip", "x", ClipLoss.needs)
    only_long = MultiTextLoss({"long": {"texts": "long", "image": "perceptual"}})
    with pytest.raises(ClipkitConfigError, match=r"scores the image head\(s\) semantic"):
        ContrastiveObjective(two.model, only_long, text_roles=("long",)).check_outputs("multi_text", "x",
                                                                                     only_long.needs)


def test_needs_name_each_head_and_each_head_has_its_own_temperature():
    from clipkit.losses import MultiTextLoss

    loss = MultiTextLoss(TERMS, form="sigmoid")
    assert loss.needs == ("image", "image@perceptual", "text_alt", "text_alt_valid", "text_long@perceptual",
                          "text_long_valid")
    assert sorted(k for k in loss.state_dict()) == [
        "head_temperatures.perceptual.logit_bias", "head_temperatures.perceptual.logit_scale",
        "temperature.logit_bias", "temperature.logit_scale"]
    only_perceptual = MultiTextLoss({"long": {"texts": "long", "image": "perceptual"}})
    assert not hasattr(only_perceptual, "temperature") and only_perceptual.needs[0] == "image@perceptual"


if __name__ == "__main__" and "--record" in sys.argv:
    CURVE.parent.mkdir(exist_ok=True)
    CURVE.write_text(json.dumps(one_head_curve(), indent=1) + "\n")
    print(f"wrote {CURVE}")
