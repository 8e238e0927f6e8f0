"""Acceptance: the same seed and global batch on 1 and 2 processes give the same step-1 loss
(1e-5) and temperature gradient, through the real DeepSpeed engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli, torchrun

WORKER = str(Path(__file__).with_name("split_worker.py"))


@pytest.mark.parametrize("loss_name,zero_stage", [("clip", 2), ("siglip", 0)])
def test_one_and_two_processes_agree(tmp_path, loss_name, zero_stage):
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}.json"
        run_cli(torchrun(nproc, [WORKER, str(out), str(zero_stage), loss_name]), REPO)
        results[nproc] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert abs(one["loss"] - two["loss"]) < 1e-5
    for name, grad in one["loss_param_grads"].items():
        assert grad[0] != 0.0
        assert two["loss_param_grads"][name][0] == pytest.approx(grad[0], rel=1e-5, abs=1e-7), name
    assert two["patch_embed_grad_norm"] == pytest.approx(one["patch_embed_grad_norm"], rel=1e-4)
