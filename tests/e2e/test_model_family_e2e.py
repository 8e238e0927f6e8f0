"""Every model-family experiment trains end to end through `clipkit-train` (real DeepSpeed,
real digits shards), evaluates, and exports to open_clip with the same image and text embeddings
(and, for CoCa, the same caption logits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from conftest import run_cli

TRAIN = [sys.executable, "-m", "clipkit.train"]
FAMILIES = ["coca", "filip", "lit", "flip", "taildrop", "distill"]


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_evaluates_and_exports(family, digits_root, demo_export):
    from clipkit.checkpoint import Checkpointer, fp32_state_dict
    from clipkit.losses import ClipLoss
    from clipkit.models import build_model
    from clipkit.objective import ContrastiveObjective

    run_name = f"family_{family}"
    beams = ["eval.sets.digits.caption_beams=2"] if family == "coca" else []  # beam search from the config
    run_cli([*TRAIN, f"experiment={family}_digits", "debug=fast", "trainer.max_steps=4", f"run_name={run_name}",
             "trainer.export_open_clip=true", *beams], digits_root)
    run_dir = digits_root / "outputs" / run_name
    losses = train_losses(run_dir)
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    result = json.loads((run_dir / "eval" / "digits_zeroshot_classification.json").read_text())
    assert 0.0 <= result["metrics"]["acc1"] <= 1.0
    if family == "coca":  # the experiment adds the captioning task to the digits set
        captioning = json.loads((run_dir / "eval" / "digits_captioning.json").read_text())["metrics"]
        assert captioning["caption_ce"] > 0 and {"bleu4", "cider"} <= set(captioning)
        assert len(json.loads((run_dir / "eval" / "digits_captions.json").read_text())) == 360

    cfg = json.loads((run_dir / "open_clip_config.json").read_text())
    name = f"clipkit-e2e-{family}"
    bundle = build_model(name, config=cfg["model_cfg"])
    ours = ContrastiveObjective(bundle.model, ClipLoss()).eval()
    state = fp32_state_dict(run_dir / "checkpoints" / Checkpointer(run_dir / "checkpoints").latest_tag())
    ours.load_state_dict({k: v for k, v in state.items()
                          if k.startswith("model.") or k == "loss.temperature.logit_scale"}, strict=True)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'export'}")
    model.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(f"local-dir:{run_dir / 'export'}")(["a handwritten seven.", "zero", ""])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True), ours.encode_image(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), ours.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)
        if family == "coca":  # the caption decoder travels too: same next-token logits
            torch.testing.assert_close(model(images, tokens)["logits"], bundle.model(images, tokens)["logits"],
                                       rtol=1e-5, atol=1e-5)
    assert type(model).__name__ == ("CoCa" if family == "coca" else "CLIP")


def test_clipkit_eval_scores_a_filip_run_token_wise(digits_root, demo_export):
    """clipkit-eval on a FILIP run gives the numbers of the run's own (token-wise) final eval."""
    run_dir = digits_root / "outputs" / "family_filip"
    if not run_dir.exists():
        run_cli([*TRAIN, "experiment=filip_digits", "debug=fast", "trainer.max_steps=4", "run_name=family_filip"],
                digits_root)
    out = digits_root / "outputs" / "eval_filip"
    run_cli([sys.executable, "-m", "clipkit.evaluate", f"run_dir={run_dir}", f"out_dir={out}"], digits_root)
    for task in ("zeroshot_classification", "retrieval"):
        during = json.loads((run_dir / "eval" / f"digits_{task}.json").read_text())["metrics"]
        after = json.loads((out / run_dir.name / f"digits_{task}.json").read_text())["metrics"]
        for key, value in during.items():
            assert after[key] == pytest.approx(value, abs=1e-6), (task, key)
