"""The PNG summary of a run: training loss and zero-shot top-1 against step."""

from __future__ import annotations

import json
from pathlib import Path


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Reads `metrics.jsonl` and writes loss (left) and every `*/acc1` series (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_steps, losses, acc = [], [], {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("train/loss") is not None:
            loss_steps.append(rec["step"])
            losses.append(rec["train/loss"])
        for key, value in rec.items():
            if key.endswith("/acc1") and value is not None:
                acc.setdefault(key, ([], []))
                acc[key][0].append(rec["step"])
                acc[key][1].append(value)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(loss_steps, losses)
    ax_loss.set(xlabel="step", ylabel="train loss", title="loss")
    for key, (steps, values) in acc.items():
        ax_acc.plot(steps, values, marker="o", label=key)
    ax_acc.set(xlabel="step", ylabel="top-1", title="zero-shot accuracy", ylim=(0, 1))
    if acc:
        ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
