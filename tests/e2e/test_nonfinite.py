"""A poisoned batch (NaN pixels on one rank) through the real Trainer and DeepSpeed engine:
`trainer.nonfinite=skip` drops that step on every rank, names its samples and trains on;
`stop` ends the run at that step naming them. No weight ever turns non-finite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, torchrun

WORKER = str(Path(__file__).with_name("nonfinite_worker.py"))


@pytest.mark.parametrize("nproc,zero_stage", [(1, 0), (2, 2)])
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_poisoned_batch(tmp_path, nproc, zero_stage, policy):
    out = tmp_path / "result.json"
    run_cli(torchrun(nproc, [WORKER, str(out), policy, str(zero_stage)]), REPO)
    result = json.loads(out.read_text())
    poisoned = [f"rank{nproc - 1}#0"]
    assert result["finite"]
    if policy == "skip":
        assert result["error"] is None and result["skipped"] == [3] and result["global_steps"] == 5
        assert poisoned[0] in result["skipped_keys"][0] and len(result["skipped_keys"][0]) == 8
        assert sorted(int(s) for s in result["losses"]) == [1, 2, 3, 4, 5, 6]
        assert all(v is not None for s, v in result["losses"].items() if s != "3")
    else:
        assert "loss is nan at step 3" in result["error"] and poisoned[0] in result["error"]
        assert result["skipped"] == [] and result["global_steps"] == 2
