"""`clipkit-eval` / `python -m clipkit.evaluate`: zero-shot, retrieval and selection on `eval.sets`.

Scores a clipkit run directory (its latest checkpoint, converted to open_clip format in a
temporary folder; the run directory is only read) or any open_clip model plus local weights. Writes one CLIP_benchmark JSON per
(model, set, task) as `out_dir/<model>/<set>_<task>.json`, and `summary.csv` and `summary.md`
(rows per model, dataset, task, across every model scored into `out_dir`).

    clipkit-eval run_dir=outputs/demo_digits-clip eval.search.index=hnsw eval.cache_dir=outputs/emb_cache

Under `srun` or torchrun with several ranks (launch/slurm/eval.sbatch) the ranks join a process
group, each embeds its share of every set and the suite gathers the shares; rank 0 writes.
"""

from __future__ import annotations

import re
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from clipkit import distributed
from clipkit.checkpoint import Checkpointer, export_open_clip
from clipkit.config import CONF_DIR, freeze, preflight
from clipkit.errors import ClipkitConfigError
from clipkit.run_dir import RunDir


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device):
    """-> (model in eval mode, val transform, tokenizer) straight from open_clip."""
    import open_clip

    from clipkit.models.factory import missing_weights_explained

    with missing_weights_explained(model_name, pretrained, key="pretrained"):
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


class ExportedHeads:
    """A run's per-head open_clip exports (`clipkit-export`: the semantic head in the folder, each
    extra head in `<folder>/<head>/`) scored as one model: `encode_image(images, head)` and
    `encode_text(tokens, head)` call that head's open_clip model; everything else is the semantic one's."""

    def __init__(self, objectives: dict):
        self.by_head = objectives

    def heads(self) -> tuple[str, ...]:
        return tuple(self.by_head)

    def encode_image(self, images: torch.Tensor, head: str = "semantic") -> torch.Tensor:
        return self.by_head[head].encode_image(images)

    def encode_text(self, tokens: torch.Tensor, head: str = "semantic") -> torch.Tensor:
        return self.by_head[head].encode_text(tokens)

    def encode_image_heads(self, images: torch.Tensor, heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {head: self.encode_image(images, head) for head in heads}   # one exported model per head

    def encode_text_heads(self, tokens: torch.Tensor, heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {head: self.encode_text(tokens, head) for head in heads}

    def __getattr__(self, name: str):
        if name == "by_head":
            raise AttributeError(name)
        return getattr(self.by_head["semantic"], name)


def run_loss_needs(run_dir: RunDir | None) -> tuple[str, ...]:
    """The model outputs the run's loss trained on (its class's `needs`), read from the run's
    config without building the loss; () for an open_clip model."""
    if run_dir is None or not run_dir.config.exists():
        return ()
    from hydra.utils import get_class

    return tuple(getattr(get_class(OmegaConf.load(run_dir.config).loss._target_), "needs", ()))


def checkpoint_tag(run_dir: RunDir | None, pretrained: str | None) -> str:
    """Names the weights being scored, for the embedding cache key: the run's latest
    checkpoint tag, or the weights file's name and modification time."""
    if run_dir is not None:
        return Checkpointer(run_dir.checkpoints).latest_tag() or "latest"
    path = Path(str(pretrained))
    return f"{path.name}-{path.stat().st_mtime_ns}" if pretrained and path.is_file() else str(pretrained)


def result_folder(label: str) -> str:
    """A model label ("ViT-B-32-weights.pt", a run name) as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"


def check(cfg: DictConfig) -> None:
    """What is checked before any model is loaded (`preflight` runs it, and `clipkit-launch`
    on the login node): eval sets, search keys, and exactly one existing model to score."""
    from clipkit.eval.suite import build_eval_specs, build_search_config

    if not build_eval_specs(cfg.eval.sets):
        raise ClipkitConfigError("no eval sets: choose one with eval=<name> (see conf/eval/)")
    build_search_config(cfg.eval)
    if (cfg.run_dir is None) == (cfg.model_name is None):
        raise ClipkitConfigError("give exactly one of run_dir=<clipkit run> or model_name=<open_clip name>")
    if cfg.run_dir is not None and not RunDir(cfg.run_dir).root.is_dir():
        raise ClipkitConfigError(f"run_dir not found: {RunDir(cfg.run_dir).root}")
    if cfg.model_name is not None:
        from clipkit.models.factory import check_pretrained_file

        check_pretrained_file(cfg.model_name, cfg.pretrained, key="pretrained")


def init_distributed() -> distributed.DistInfo:
    """Joins the ranks' process group when there are several (srun's or torchrun's env); one
    process needs none. gloo on CPU, NCCL on GPU."""
    info = distributed.env_dist_info()
    if info.world_size > 1 and not distributed.is_initialized():
        distributed.export_torch_env(info)
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             timeout=timedelta(minutes=30))
    return info


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from clipkit.eval.runner import write_summary
    from clipkit.eval.scoring import build_scorer
    from clipkit.eval.suite import EvalSuite, build_eval_specs, build_search_config, check_heads, model_heads
    from clipkit.eval.text_context import check_text_context
    from clipkit.objective import ContrastiveObjective

    if not OmegaConf.is_readonly(cfg):
        freeze(cfg, "eval")
    check(cfg)
    specs = build_eval_specs(cfg.eval.sets)
    search = build_search_config(cfg.eval)
    run_dir = RunDir(cfg.run_dir) if cfg.run_dir is not None else None
    scorer = build_scorer(cfg.eval.scoring, run_loss_needs(run_dir))
    dist = init_distributed()
    device = torch.device(f"cuda:{dist.local_rank}" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    with tempfile.TemporaryDirectory(prefix="clipkit_eval_export_") as scratch:
        if run_dir is not None:
            weights = export_open_clip(run_dir.root, out_dir=scratch)
            model_name, pretrained, label = f"local-dir:{weights.parent}", None, run_dir.name
        else:
            model_name, pretrained = cfg.model_name, cfg.pretrained
            label = model_name if pretrained is None else f"{model_name}-{Path(str(pretrained)).name}"
        model, preprocess, tokenizer = load_open_clip(model_name, pretrained, device)
        scored = ContrastiveObjective(model, loss=None)
        if run_dir is not None:
            # A run with extra image heads (model.heads) was exported once per head: each loads as itself.
            extra = {folder.name: ContrastiveObjective(load_open_clip(f"local-dir:{folder}", None, device)[0], loss=None)
                     for folder in sorted(weights.parent.iterdir()) if (folder / "open_clip_config.json").is_file()}
            if extra:
                scored = ExportedHeads({"semantic": scored, **extra})
    check_text_context(specs, model)   # a set's context_length beyond the model's positions: one line, now
    check_heads(specs, model_heads(scored))
    # One folder of CLIP_benchmark JSONs per scored model, so evals of several models (or of one
    # architecture with several weight files) into one out_dir never overwrite each other.
    suite = EvalSuite(specs, preprocess=preprocess, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                      out_dir=Path(cfg.out_dir) / result_folder(label), model_name=label,
                      pretrained=str(pretrained or label),
                      search=search, cache_dir=cfg.eval.cache_dir, scorer=scorer)
    metrics = suite.run(scored, device=device, tag=checkpoint_tag(run_dir, pretrained))
    if dist.is_main:
        write_summary(cfg.out_dir, label, suite.last_results)
        print(suite.results_table(), flush=True)
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ClipkitConfigError as err:
        sys.exit(f"clipkit-eval: error: {err}")


def main() -> None:
    sys.argv[1:] = preflight("clipkit-eval", "eval", sys.argv[1:], check=check)
    _hydra_main()


if __name__ == "__main__":
    main()
