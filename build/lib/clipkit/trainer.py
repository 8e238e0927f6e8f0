"""The step loop: batch -> engine forward/backward/step -> log, checkpoint, eval on cadence,
and a checkpoint-then-stop when a preemption signal arrives (`clipkit.preemption`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from clipkit import distributed
from clipkit.checkpoint import Checkpointer
from clipkit.loggers import MetricLoggers
from clipkit.preemption import PreemptionWatch


class NonFiniteLossError(FloatingPointError):
    """Raised on every rank at once (the loss is all-reduced first), so none hangs."""


@dataclass
class TrainerSettings:
    max_steps: int
    global_batch_size: int
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0   # 0: only at the end
    eval_every_n_steps: int = 0         # 0: none during training
    progress_bar: bool = True


class Trainer:
    """Runs steps `start_step+1 .. max_steps` on a DeepSpeed engine wrapping a ContrastiveObjective."""

    def __init__(self, engine, batches: Iterable, settings: TrainerSettings, *, checkpointer: Checkpointer,
                 loggers: MetricLoggers, evaluate: Callable[[int], dict[str, float]] | None,
                 client_state: Callable[[int], dict[str, Any]],
                 data_stats: Callable[[], dict[str, float]] | None = None,
                 preemption: PreemptionWatch | None = None):
        """`client_state(step)` and `data_stats()` are called on every rank at the same step
        (both may be collectives): the first goes into each checkpoint, the second into each log record.
        After `fit`, `preempted_at` is the step a preemption signal stopped the run at (None: it ran out)."""
        self.engine = engine
        self.batches = batches
        self.s = settings
        self.checkpointer = checkpointer
        self.loggers = loggers
        self.evaluate = evaluate
        self.client_state = client_state
        self.data_stats = data_stats
        self.preemption = preemption
        self.stop_requested = False
        self.preempted_at: int | None = None

    def _progress(self, start_step: int):
        if not (self.s.progress_bar and distributed.rank() == 0):
            return None
        from tqdm import tqdm

        return tqdm(total=self.s.max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def train_step(self, images: torch.Tensor, tokens: torch.Tensor, step: int) -> dict[str, float]:
        device = self.engine.device
        on_step = getattr(self.engine.module, "on_step", None)
        if on_step is not None:  # per-step model behaviour (TailDrop's k, FLIP's unmasked tuning)
            on_step(step)
        loss, metrics = self.engine(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))
        # One all-reduce carries the loss and the preemption flag: every rank learns of a signal
        # that reached any of them at this same step. The rank share is scaled by world size, so
        # the mean over ranks is the global loss.
        flag = self.preemption.flag if self.preemption is not None else 0.0
        summed = distributed.all_reduce(torch.stack([loss.detach().float().reshape(()), loss.new_tensor(flag).float()]))
        global_loss = float(summed[0]) / distributed.world_size()
        self.stop_requested = float(summed[1]) > 0
        if not torch.isfinite(torch.tensor(global_loss)):
            raise NonFiniteLossError(
                f"loss is {global_loss} at step {step}; the last checkpoint is intact. Lower optim.lr "
                f"or trainer.grad_clip, or check the data")
        self.engine.backward(loss)
        self.engine.step()
        return {"train/loss": global_loss, **{f"train/{k}": float(v) for k, v in metrics.items()}}

    def fit(self, start_step: int) -> int:
        """Returns the last step run; checkpoints at the end."""
        bar = self._progress(start_step)
        batches = iter(self.batches)
        try:
            step, t_last, step_last = start_step, time.perf_counter(), start_step
            for step in range(start_step + 1, self.s.max_steps + 1):
                images, tokens = next(batches)
                record = self.train_step(images, tokens, step)
                if bar is not None:
                    bar.update(1)
                if step % self.s.log_every_n_steps == 0 or step == self.s.max_steps:
                    now = time.perf_counter()
                    record["train/samples_per_s"] = (step - step_last) * self.s.global_batch_size / (now - t_last)
                    record["train/lr"] = float(self.engine.get_lr()[0])
                    t_last, step_last = now, step
                    if self.data_stats is not None:
                        record.update(self.data_stats())
                    self.loggers.log({"step": step, **record})
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                        samples_s=f"{record['train/samples_per_s']:.0f}")
                last = step == self.s.max_steps
                preempted = self.stop_requested and not last
                every = self.s.checkpoint_every_n_steps
                if last or preempted or (every and step % every == 0):
                    self.checkpointer.save(self.engine, step, self.client_state(step))
                if preempted:
                    self.preempted_at = step
                    break
                # The final eval belongs to the caller, which also runs it for an already-finished run.
                if (self.evaluate is not None and not last and self.s.eval_every_n_steps
                        and step % self.s.eval_every_n_steps == 0):
                    self.loggers.log({"step": step, **self.evaluate(step)})
        finally:
            # Stops the data workers now (before the caller's final eval), also when a step raised.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if bar is not None:
            bar.close()
        return step
