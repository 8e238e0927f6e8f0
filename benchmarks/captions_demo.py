"""The two-level caption demo's table: short-caption-only training against both caption levels,
with and without hard negatives, several seeds each, scored on the held-out digits.

    python benchmarks/captions_demo.py --seeds 0 1 2            # 3 recipes x 3 seeds, then the table
    python benchmarks/captions_demo.py --table-only              # re-print the table from finished runs
    python benchmarks/captions_demo.py --heads --seeds 0 1 2     # short-only, one shared head, two heads

Each run is `clipkit-train experiment=<recipe> seed=<s>` (conf/experiment/captions_digits_*.yaml) in
--root (CLIPKIT_ROOT; the shards are written there first with `clipkit-shards digits-captions`); a
finished run is not run again. The metrics are the final eval record of each run's metrics.jsonl:
zero-shot top-1 on the 360 held-out digits, long-caption retrieval R@1 both ways
(`digits_long`) and selection accuracy of the true long caption against its attribute-swapped
negatives (`digits_selection`). Writes benchmarks/results/captions_demo_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

RECIPES = ("captions_digits_short", "captions_digits_long", "captions_digits_negatives")
METRICS = {
    "zero-shot top-1": "digits/acc1",
    "long R@1 image->text": "digits_long/text_retrieval_recall@1",
    "long R@1 text->image": "digits_long/image_retrieval_recall@1",
    "selection acc": "digits_selection/acc",
}
# --heads (issue 20): the decoupled pathways against one shared head and short-only training. Each metric
# names the head that scores it; a one-head run has only its tower's head, which then serves both tasks
# (the fallback key), and no CKA.
HEAD_RECIPES = ("captions_digits_short", "captions_digits_long", "captions_digits_heads")
HEAD_METRICS = {
    "zero-shot top-1 (semantic)": ("digits/acc1", "digits/acc1"),
    "long R@1 image->text (perceptual)": ("digits_long/text_retrieval_recall@1",) * 2,
    "long R@1 text->image (perceptual)": ("digits_long/image_retrieval_recall@1",) * 2,
    "selection acc (perceptual)": ("digits_selection/acc",) * 2,
    "zero-shot top-1 (perceptual: cross-use)": ("digits@perceptual/acc1", "digits/acc1"),
    "long R@1 image->text (semantic: cross-use)": ("digits_long@semantic/text_retrieval_recall@1",
                                                   "digits_long/text_retrieval_recall@1"),
    "long R@1 text->image (semantic: cross-use)": ("digits_long@semantic/image_retrieval_recall@1",
                                                   "digits_long/image_retrieval_recall@1"),
    "linear CKA semantic/perceptual": ("digits/linear_cka_semantic_perceptual", None),
}
BIN = Path(sys.executable).parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_dir(root: Path, recipe: str, seed: int) -> Path:
    return root / "outputs" / f"{recipe}-seed{seed}"


def final_eval(path: Path) -> dict[str, float] | None:
    """The last eval record of a finished run, or None."""
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    evals = [r for r in records if METRICS["selection acc"] in r]
    return evals[-1] if evals else None


def train(root: Path, recipe: str, seed: int, extra: list[str], threads: int | None) -> float:
    """Runs one recipe; returns its wall seconds."""
    env = {**os.environ, "CLIPKIT_ROOT": str(root), "HF_HUB_OFFLINE": "1"}
    if threads:
        # On a shared machine torch's threads spin against the other jobs' (system time rises
        # several-fold); one thread per run keeps each step's cost near its share of a core.
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run([str(BIN / "clipkit-train"), f"experiment={recipe}", f"seed={seed}", "trainer.progress_bar=false",
                    "trainer.resume=auto", *extra], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def head_metrics(final: dict[str, float]) -> dict[str, float | None]:
    """HEAD_METRICS of one run's final eval: the head's own key, else the one-head fallback."""
    out = {}
    for name, (key, fallback) in HEAD_METRICS.items():
        out[name] = final.get(key, final.get(fallback) if fallback else None)
    return out


def table(results: dict[str, dict[str, list[float]]], seeds: list[int]) -> str:
    names = list(next(iter(results.values()))) if results else []
    lines = [f"| recipe | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for recipe, values in results.items():
        cells = []
        for name in names:
            raw = values[name]
            if any(v is None for v in raw):
                cells.append("(one head)")
                continue
            spread = f" ± {statistics.stdev(raw):.3f}" if len(raw) > 1 else ""
            cells.append(f"{statistics.mean(raw):.3f}{spread} ({', '.join(f'{v:.3f}' for v in raw)})")
        lines.append(f"| {recipe} | {' | '.join(cells)} |")
    lines.append(f"\nmean ± standard deviation over seeds {seeds} (raw values in brackets)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("outputs/captions_demo_root"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipes", nargs="+", default=None, help="default: the three caption recipes "
                        "(with --heads: short-only, one shared head, two heads)")
    parser.add_argument("--heads", action="store_true", help="the decoupled-heads table (issue 20)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for each run (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "captions_demo_cpu.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. trainer.max_steps=200)")
    args = parser.parse_args()
    args.recipes = args.recipes or list(HEAD_RECIPES if args.heads else RECIPES)
    if args.heads and args.out == parser.get_default("out"):
        args.out = args.out.with_name("captions_heads_cpu.json")
    root = args.root.resolve()
    shards = root / "data" / "digits_captions"
    if not (shards / "train" / "nshards.txt").exists() and not args.table_only:
        subprocess.run([str(BIN / "clipkit-shards"), "digits-captions", str(shards)], check=True)
    seconds: dict[str, list[float]] = {}
    # Seed-major order: the recipes alternate, so a change of machine load touches all of them.
    for seed in args.seeds:
        for recipe in args.recipes:
            if args.table_only or final_eval(run_dir(root, recipe, seed)) is not None:
                continue
            wall = train(root, recipe, seed, args.overrides, args.threads)
            seconds.setdefault(recipe, []).append(round(wall, 1))
            print(f"{recipe} seed {seed}: {wall:.0f} s", flush=True)
    results = {}
    for recipe in args.recipes:
        finals = [final_eval(run_dir(root, recipe, seed)) for seed in args.seeds]
        if any(f is None for f in finals):
            print(f"{recipe}: not every seed has finished", file=sys.stderr)
            continue
        if args.heads:
            per_seed = [head_metrics(f) for f in finals]
            results[recipe] = {name: [m[name] for m in per_seed] for name in HEAD_METRICS}
        else:
            results[recipe] = {name: [f[key] for f in finals] for name, key in METRICS.items()}
    print(table(results, args.seeds))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": f"{cpu_name()}, {os.cpu_count()} cores", "date": str(date.today()),
                                    "seeds": args.seeds, "overrides": args.overrides, "threads": args.threads,
                                    "results": results,
                                    "wall_seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
