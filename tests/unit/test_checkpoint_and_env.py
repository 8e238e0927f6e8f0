"""Resume resolution, the open_clip key mapping, and rank discovery from torchrun/SLURM env."""

from __future__ import annotations

import pytest
import torch

from clipkit.checkpoint import Checkpointer, atomic_write_text, to_open_clip_state_dict
from clipkit.distributed import DistInfo, env_dist_info
from clipkit.errors import ClipkitConfigError


def test_resume_resolution(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.resolve_resume(None) is None and ckpt.resolve_resume("auto") is None
    with pytest.raises(ClipkitConfigError, match="no complete checkpoint"):
        ckpt.resolve_resume("latest")
    (ckpt.dir / "step_00000010").mkdir(parents=True)
    (ckpt.dir / "step_00000020").mkdir()          # written, but `latest` never flipped: incomplete
    atomic_write_text(ckpt.dir / "latest", "step_00000010")
    assert ckpt.resolve_resume("latest") == "step_00000010" == ckpt.resolve_resume("auto")
    assert ckpt.resolve_resume("step_00000020") == "step_00000020"
    with pytest.raises(ClipkitConfigError, match="already holds checkpoints"):
        ckpt.resolve_resume(None)
    with pytest.raises(ClipkitConfigError, match="no checkpoint"):
        ckpt.resolve_resume("step_00000099")


def test_open_clip_key_mapping():
    state = {"model.visual.proj": torch.ones(2, 2), "loss.temperature.logit_scale": torch.tensor([2.5]),
             "loss.temperature.logit_bias": torch.tensor([-10.0])}
    out = to_open_clip_state_dict(state)
    assert set(out) == {"visual.proj", "logit_scale", "logit_bias"}
    assert out["logit_scale"].shape == () and float(out["logit_bias"]) == -10.0


def test_rank_discovery(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(key, raising=False)
    assert env_dist_info() == DistInfo()
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert env_dist_info() == DistInfo(5, 8, 1)
    monkeypatch.setenv("RANK", "3")          # torchrun inside an allocation wins over SLURM's task ids
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert env_dist_info() == DistInfo(3, 4, 3)
