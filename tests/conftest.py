"""Shared fixtures: offline open_clip, CPU DeepSpeed, and one set of real digits shards per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")      # a missing pretrained tag must not retry the network
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A CLIPKIT_ROOT whose data/digits holds the real digits shards (train 8, test 2), and
    data/digits_captions the two-level caption demo (`clipkit-shards digits-captions`)."""
    from clipkit.data import write_digits_caption_shards, write_digits_shards

    root = tmp_path_factory.mktemp("clipkit_root")
    write_digits_shards(root / "data" / "digits")
    write_digits_caption_shards(root / "data" / "digits_captions")
    return root


def run_cli(args: list[str], root: Path, *, timeout: int = 600, check: bool = True,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a clipkit command in a fresh process with CLIPKIT_ROOT=root; returns the result."""
    env = {**os.environ, "CLIPKIT_ROOT": str(root), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, module_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *module_args]


def process_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def kill_job(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILLs a job started with `start_new_session=True` and every process in it, as when
    its node is lost, and waits until all are gone.

    torchrun starts each rank in a session of its own (torch.distributed.elastic's
    SubprocessHandler), so killing torchrun's process group alone leaves the ranks and their
    data workers running as orphans: each child's group is killed too. The children are
    listed first, while they are still the launcher's children.
    """
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
    children = [int(pid) for pid in listed.stdout.split()]
    for group in (*children, proc.pid):
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:   # a data worker: not a group leader, it is in the launcher's group
            pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in children):
        assert time.monotonic() < deadline, f"processes {children} outlived SIGKILL"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def demo_export(digits_root) -> Path:
    """An open_clip checkpoint where `make demo` exports its CLIP (LiT and distillation start
    from it): the real tiny_vit architecture in open_clip's format, random weights."""
    import open_clip
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import clipkit.config  # noqa: F401  registers the config schema that conf/train.yaml lists first
    from clipkit.models import build_model  # registers the inline tiny config with open_clip

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        model_cfg = compose("train", overrides=["model=tiny_vit"]).model
    build_model(model_cfg.name, config=OmegaConf.to_container(model_cfg.config))
    path = digits_root / "outputs" / "demo_digits-clip" / "export" / "open_clip_pytorch_model.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(model_cfg.name).state_dict(), path)
    return path
