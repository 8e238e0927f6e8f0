"""`clipkit-eval` / `python -m clipkit.evaluate`: zero-shot and retrieval on `eval.sets`.

Scores a clipkit run directory (its latest checkpoint, exported to open_clip format on the
way) or any open_clip model plus local weights. Writes one CLIP_benchmark JSON per
(model, set, task) as `out_dir/<model>/<set>_<task>.json`, and `summary.csv` and `summary.md`
(rows per model, dataset, task, across every model scored into `out_dir`).

    clipkit-eval run_dir=outputs/demo_digits-clip eval.search.index=hnsw eval.cache_dir=outputs/emb_cache
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from clipkit.config import CONF_DIR, preflight
from clipkit.errors import ClipkitConfigError


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device):
    """-> (model in eval mode, val transform, tokenizer) straight from open_clip."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def run_scoring_loss(run_dir: str | None):
    """The run's own loss when it scores pairs token-wise (FILIP), so that clipkit-eval scores
    a FILIP run the way its training-time evals did; None (pooled embeddings) otherwise."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").exists():
        return None
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    loss_cfg = OmegaConf.load(Path(run_dir) / "config.yaml").loss
    loss = instantiate({k: v for k, v in OmegaConf.to_container(loss_cfg, resolve=True).items() if k != "name"})
    return loss if "image_tokens" in getattr(loss, "needs", ()) else None


def checkpoint_tag(run_dir: str | None, pretrained: str | None) -> str:
    """Names the weights being scored, for the embedding cache key: the run's latest
    checkpoint step, or the weights file's name and modification time."""
    if run_dir is not None:
        latest = Path(run_dir) / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.exists() else "latest"
    path = Path(str(pretrained))
    return f"{path.name}-{path.stat().st_mtime_ns}" if pretrained and path.is_file() else str(pretrained)


def result_folder(label: str) -> str:
    """A model label ("ViT-B-32-weights.pt", a run name) as one safe path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"


def evaluate(cfg: DictConfig) -> dict[str, float]:
    from clipkit.checkpoint import export_open_clip
    from clipkit.eval.runner import write_summary
    from clipkit.eval.suite import EvalSuite, build_eval_specs, build_search_config
    from clipkit.objective import ContrastiveObjective

    specs = build_eval_specs(cfg.eval.sets)
    search = build_search_config(cfg.eval)
    if not specs:
        raise ClipkitConfigError("no eval sets: choose one with eval=<name> (see conf/eval/)")
    if (cfg.run_dir is None) == (cfg.model_name is None):
        raise ClipkitConfigError("give exactly one of run_dir=<clipkit run> or model_name=<open_clip name>")
    if cfg.run_dir is not None:
        if not Path(cfg.run_dir).is_dir():
            raise ClipkitConfigError(f"run_dir not found: {cfg.run_dir}")
        weights = export_open_clip(cfg.run_dir)
        model_name, pretrained, label = f"local-dir:{weights.parent}", None, Path(cfg.run_dir).name
    else:
        model_name, pretrained = cfg.model_name, cfg.pretrained
        label = model_name if pretrained is None else f"{model_name}-{Path(str(pretrained)).name}"
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    model, preprocess, tokenizer = load_open_clip(model_name, pretrained, device)
    # One folder of CLIP_benchmark JSONs per scored model, so evals of several models (or of one
    # architecture with several weight files) into one out_dir never overwrite each other.
    suite = EvalSuite(specs, preprocess=preprocess, tokenizer=tokenizer, batch_size=cfg.eval.batch_size,
                      out_dir=Path(cfg.out_dir) / result_folder(label), model_name=label,
                      pretrained=str(pretrained or label),
                      search=search, cache_dir=cfg.eval.get("cache_dir"))
    metrics = suite.run(ContrastiveObjective(model, loss=run_scoring_loss(cfg.run_dir)), device=device,
                        tag=checkpoint_tag(cfg.run_dir, pretrained))
    write_summary(cfg.out_dir, label, suite.last_results)
    print(suite.results_table(), flush=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ClipkitConfigError as err:
        sys.exit(f"clipkit-eval: error: {err}")


def main() -> None:
    preflight("clipkit-eval", "eval", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
