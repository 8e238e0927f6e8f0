"""clipkit.models.factory: inline configs registered with open_clip leave nothing on disk."""

from __future__ import annotations

import tempfile

import open_clip
import torch

from clipkit.models import build_model

TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_building_inline_models_leaves_no_temp_dirs(tmp_path, monkeypatch):
    # A private temp folder: other processes on the machine may create temp dirs meanwhile.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = build_model("clipkit-test-factory", config=TINY)
    wider = {**TINY, "embed_dim": 24}
    second = build_model("clipkit-test-factory", config=wider)
    assert list(tmp_path.iterdir()) == []
    # The second registration under the same name wins, in the model and in open_clip's registry.
    assert first.model_cfg["embed_dim"] == 16 and second.model_cfg["embed_dim"] == 24
    assert open_clip.get_model_config("clipkit-test-factory")["embed_dim"] == 24
    assert second.model.encode_text(second.tokenizer(["a digit"])).shape == torch.Size([1, 24])
