"""Resume resolution, safe checkpoint reads, the model check, the open_clip key mapping, and rank
discovery from torchrun/SLURM env."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipkit.checkpoint import (
    Checkpointer,
    SavedLayout,
    atomic_write_text,
    check_resume_layout,
    check_same_model,
    convert_to_universal,
    load_file,
    read_tag,
    restore_param_groups,
    restore_untrained_state,
    saved_layout,
    to_open_clip_state_dict,
    unshare_step_counts,
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


def test_the_saved_layout_decides_how_a_checkpoint_resumes(tmp_path):
    torch.save({"module": {}, "layout": {"world_size": 2, "zero_stage": 1}}, tmp_path / "mp_rank_00_model_states.pt")
    assert saved_layout(tmp_path) == SavedLayout(2, 1)
    # Checkpoints from before the layout was recorded: DeepSpeed's own fields.
    torch.save({"module": {}, "dp_world_size": 4, "ds_config": {"zero_optimization": {"stage": 2}}},
               tmp_path / "mp_rank_00_model_states.pt")
    assert saved_layout(tmp_path) == SavedLayout(4, 2)
    for stage in (0, 1, 2, 3):
        assert check_resume_layout(SavedLayout(2, stage), "t", world_size=2, zero_stage=stage) is False
        assert check_resume_layout(SavedLayout(2, stage), "t", world_size=3, zero_stage=stage) is (stage > 0)
    with pytest.raises(ClipkitConfigError, match=r"^checkpoint step_00000010 was written by 2 ranks at ZeRO stage 2; "
                                                 r"resume it on 1 ranks at the same stage \(trainer.zero_stage=2\)$"):
        check_resume_layout(SavedLayout(2, 2), "step_00000010", world_size=1, zero_stage=1)


def test_a_universal_load_gets_buffers_frozen_weights_groups_and_own_step_counts():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module[0].bias.requires_grad_(False)
    saved = {k: v + 1 if v.is_floating_point() else v + 5 for k, v in module.state_dict().items()}
    copied = restore_untrained_state(module, saved)
    assert set(copied) == {"0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert torch.equal(module[1].running_var, saved["1.running_var"]) and torch.equal(module[0].bias, saved["0.bias"])
    assert not torch.equal(module[0].weight, saved["0.weight"])   # trained: the optimizer state's business
    optimizer = torch.optim.AdamW([{"params": [module[0].weight], "weight_decay": 0.2},
                                   {"params": [module[1].weight], "weight_decay": 0.0}])
    restore_param_groups(optimizer, [{"params": [0], "weight_decay": 0.1, "lr": 2.0}, {"params": [1], "lr": 2.0}])
    assert [(g["weight_decay"], g["lr"]) for g in optimizer.param_groups] == [(0.1, 2.0), (0.0, 2.0)]
    with pytest.raises(ClipkitConfigError, match="1 parameter groups, this run's 2"):
        restore_param_groups(optimizer, [{"params": [0]}])
    shared = torch.tensor(3.0)
    for p in (module[0].weight, module[1].weight):
        optimizer.state[p]["step"] = shared
    unshare_step_counts(optimizer)
    steps = [optimizer.state[p]["step"] for p in (module[0].weight, module[1].weight)]
    assert steps[0] is not steps[1] and float(steps[0]) == float(steps[1]) == 3.0


def test_a_conversion_cut_short_is_never_loaded(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    def dies_halfway(args):
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    def converts(args):
        (Path(args.output_folder) / "zero").mkdir(parents=True)
        (Path(args.output_folder) / "mp_rank_00_model_states.pt").write_bytes(b"states")
        (Path(args.output_folder).parent / "latest_universal").write_text(Path(args.output_folder).name)

    out = tmp_path / "universal" / "step_00000003"
    out.parent.mkdir()
    monkeypatch.setattr(ds_to_universal, "main", dies_halfway)
    with pytest.raises(OSError):
        convert_to_universal(tmp_path / "step_00000003", out)
    assert not out.exists()                              # only the scratch copy was written
    ckpt = Checkpointer(tmp_path)
    monkeypatch.setattr(ds_to_universal, "main", converts)
    assert ckpt.universal_dir("step_00000003") == out    # the next try starts over
    assert sorted(p.name for p in out.parent.iterdir()) == ["step_00000003"]
    monkeypatch.setattr(ds_to_universal, "main", dies_halfway)
    assert ckpt.universal_dir("step_00000003") == out    # complete: reused, not converted again


def test_pruning_a_tag_removes_its_universal_conversion(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=1)
    for tag in ("step_00000003", "step_00000006"):
        (tmp_path / tag).mkdir()
        (tmp_path / "universal" / tag / "zero").mkdir(parents=True)
    ckpt._prune(keep="step_00000006")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "universal"]
    assert [p.name for p in (tmp_path / "universal").iterdir()] == ["step_00000006"]


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
