"""Resume resolution, safe checkpoint reads, the model check, the open_clip key mapping, and rank
discovery from torchrun/SLURM env."""

from __future__ import annotations

import pytest
import torch

from clipkit.checkpoint import (
    Checkpointer,
    atomic_write_text,
    check_same_model,
    load_file,
    read_tag,
    to_open_clip_state_dict,
)
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


class _Payload:
    """Pickles as a call to os.system: what an unsafe torch.load would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_files_are_loaded_safely(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload(marker)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(ClipkitConfigError, match=r"holds objects a safe load refuses \(.*GLOBAL posix.system"):
        read_tag(tmp_path)
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "mp_rank_00_model_states.pt")
    assert torch.equal(load_file(tmp_path / "mp_rank_00_model_states.pt")["module"]["w"], torch.ones(2))
    (tmp_path / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ClipkitConfigError, match="is incomplete: it has no mp_rank_00_model_states.pt"):
        read_tag(tmp_path)


def test_a_different_model_is_listed_by_key_and_shape():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    check_same_model(dict(expected), expected, "checkpoint x", "fix it")
    with pytest.raises(ClipkitConfigError) as err:
        check_same_model({"a": (2, 5), "b": (4,), "d": (7,)}, expected, "checkpoint x", "fix it")
    assert str(err.value) == ("checkpoint x was written for a different model: 1 shapes differ (checkpoint vs model): "
                              "a [2, 5] vs [2, 3]; 1 model keys are not in the checkpoint: c; 1 checkpoint keys are "
                              "not in the model: d; fix it")


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
