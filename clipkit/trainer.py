"""The step loop: batch -> engine forward/backward/step -> log, checkpoint, eval on cadence,
and a checkpoint-then-stop when a preemption signal arrives (`clipkit.preemption`).

Each log record also says where the time went over its window (`time/*_frac`, `StepTimes`);
without a progress bar (`trainer.progress_bar=false`, as under SLURM) rank 0 writes the same
summary as a plain line on the `clipkit.trainer` logger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from clipkit import distributed
from clipkit.accumulation import CachedGradientStep
from clipkit.checkpoint import Checkpointer
from clipkit.engine import cap_logit_scales
from clipkit.loggers import MetricLoggers
from clipkit.preemption import PreemptionWatch

log = logging.getLogger(__name__)

# The first log window of a run also holds the data workers' start, the first shard opens and
# the first steps' one-off costs (allocator, DeepSpeed setup): no warning is drawn from it.
DATA_WAIT_WARMUP_WINDOWS = 1


NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """Raised on every rank at once (the loss is all-reduced first), so none hangs."""


def _gradients_finite(engine) -> bool:
    """Collective: False when any rank's reduced gradient holds a NaN or inf.

    Only the plain fp32 ZeRO-0 engine needs this: DeepSpeed's ZeRO 1-3 and bf16 optimizers check
    the gradient norm themselves, skip such a step and say so through `engine.was_step_applied()`.
    """
    if hasattr(engine.optimizer, "overflow"):
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    # One fused pass: a NaN or inf anywhere makes its tensor's norm, and the sum, non-finite.
    # (A tensor per check, each synchronised by bool(), cost 5% of the tiny CLIP's CPU step.)
    bad = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
    return float(distributed.all_reduce(torch.tensor([float(bad)]), "max")) == 0.0


@dataclass
class TrainerSettings:
    max_steps: int
    global_batch_size: int
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0   # 0: only at the end
    eval_every_n_steps: int = 0         # 0: none during training
    progress_bar: bool = True
    data_wait_warn_frac: float = 0.2    # warn once when waiting for data takes more of a log window
    accum_steps: int = 1                # > 1: exact accumulation over micro-batches (clipkit.accumulation)
    nonfinite: str = "stop"             # a NaN/inf loss or gradient: stop | skip the step (NONFINITE_POLICIES)
    max_consecutive_skips: int = 10     # skip: stop after this many non-finite steps in a row


class StepTimes:
    """Seconds spent in each phase of the step over one log window, on the host's clock.

    Phases: `data_wait` (blocked in `next(batches)`), `forward` (the batch to the device, then
    the engine forward, the loss included), `backward` (`engine.backward`) and `optimizer`
    (`engine.step`: clipping, the update, the lr schedule). The rest of the window is `other`:
    the loss all-reduce (where a rank waits for slower ones), logging, checkpoints and evals.

    With `synchronize` (the engine is on CUDA) the clock is read after `torch.cuda.synchronize()`:
    kernels run asynchronously, so otherwise a phase would be charged for earlier phases'
    kernels whenever it first blocks on the GPU.
    """

    PHASES = ("data_wait", "forward", "backward", "optimizer")

    def __init__(self, synchronize: bool):
        self.synchronize = synchronize
        self.restart()

    def clock(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def restart(self) -> None:
        """Starts a new window now."""
        self.started = self.clock()
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = self.clock()
        yield
        self.seconds[name] += self.clock() - start

    def close_window(self, steps: int) -> dict[str, float]:
        """Ends the window of `steps` steps and starts the next. -> `time/step_s` (mean seconds
        per step) and `time/<phase>_frac` for each phase and `other`: fractions of the window's
        wall time, summing to 1."""
        wall = max(self.clock() - self.started, 1e-9)
        record = {"time/step_s": wall / max(steps, 1)}
        record.update({f"time/{name}_frac": seconds / wall for name, seconds in self.seconds.items()})
        record["time/other_frac"] = max(0.0, 1.0 - sum(self.seconds.values()) / wall)
        self.restart()
        return record


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 42 -> '42s' (an ETA: minutes are enough past an hour)."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Trainer:
    """Runs steps `start_step+1 .. max_steps` on a DeepSpeed engine wrapping a ContrastiveObjective."""

    def __init__(self, engine, batches: Iterable, settings: TrainerSettings, *, checkpointer: Checkpointer,
                 loggers: MetricLoggers, evaluate: Callable[[int], dict[str, float]] | None,
                 client_state: Callable[[int], dict[str, Any]],
                 data_stats: Callable[[], dict[str, float]] | None = None,
                 preemption: PreemptionWatch | None = None,
                 batch_keys: Callable[[], list[str]] | None = None):
        """`client_state(step)` and `data_stats()` are called on every rank at the same step
        (both may be collectives): the first goes into each checkpoint, the second into each log record.
        After `fit`, `preempted_at` is the step a preemption signal stopped the run at (None: it ran out).
        `batch_keys()` names this rank's samples of the last batch, for the non-finite report."""
        self.engine = engine
        self.batches = batches
        self.s = settings
        self.checkpointer = checkpointer
        self.loggers = loggers
        self.evaluate = evaluate
        self.client_state = client_state
        self.data_stats = data_stats
        self.preemption = preemption
        self.batch_keys = batch_keys
        if settings.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"trainer.nonfinite={settings.nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}")
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self.stop_requested = False
        self.preempted_at: int | None = None
        self.times = StepTimes(synchronize=torch.device(engine.device).type == "cuda")
        self.accumulation = CachedGradientStep(engine, settings.accum_steps) if settings.accum_steps > 1 else None
        self._windows = 0            # log windows closed in this `fit`
        self._warned_data_wait = False

    def _progress(self, start_step: int):
        if not (self.s.progress_bar and distributed.rank() == 0):
            return None
        from tqdm import tqdm

        return tqdm(total=self.s.max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def train_step(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, float]:
        """One optimizer step on `batch`, this rank's dict of tensors (`ContrastiveObjective.forward`)."""
        device = self.engine.device
        on_step = getattr(self.engine.module, "on_step", None)
        if on_step is not None:  # per-step model behaviour (TailDrop's k, FLIP's unmasked tuning)
            on_step(step)
        # The loss is not timed apart from the towers: its backward (most of a chunked loss's
        # work) runs inside engine.backward, so a forward-only loss share would understate it.
        forward = self.accumulation.forward if self.accumulation is not None else self.engine
        with self.times.phase("forward"):   # with accumulation: the cached forwards and the loss's gradients
            loss, metrics = forward({name: value.to(device, non_blocking=True) for name, value in batch.items()})
        # One all-reduce carries the loss and the preemption flag: every rank learns of a signal
        # that reached any of them at this same step. The rank share is scaled by world size, so
        # the mean over ranks is the global loss.
        # Metrics named `loss_*` (a multi-term loss's terms) are rank shares like the loss: the same
        # all-reduce averages them; the others (temperature, bias) are equal on every rank.
        flag = self.preemption.flag if self.preemption is not None else 0.0
        shares = [name for name in metrics if name.startswith("loss_")]
        summed = distributed.all_reduce(torch.stack([loss.detach().float().reshape(()), loss.new_tensor(flag).float(),
                                                     *(metrics[name].detach().float().reshape(()) for name in shares)]))
        global_loss = float(summed[0]) / distributed.world_size()
        self.stop_requested = float(summed[1]) > 0
        record = {"train/loss": global_loss, **{f"train/{k}": float(v) for k, v in metrics.items()}}
        record.update({f"train/{name}": float(value) / distributed.world_size()
                       for name, value in zip(shares, summed[2:])})
        if not torch.isfinite(torch.tensor(global_loss)):
            # Nothing was backpropagated: the step is dropped before it touches any gradient.
            return self._nonfinite(step, f"loss is {global_loss}", record)
        with self.times.phase("backward"):  # with accumulation: every micro-batch's re-forward and backward
            if self.accumulation is not None:
                self.accumulation.backward()
            else:
                self.engine.backward(loss)
        with self.times.phase("optimizer"):
            finite = _gradients_finite(self.engine)
            if not finite:   # fp32 ZeRO-0: no update from these gradients; the step closes the boundary
                for p in self.engine.module.parameters():
                    p.grad = None
            if self.accumulation is not None:
                self.accumulation.optimizer_step()
            else:
                self.engine.step()
        if not finite or not self.engine.was_step_applied():
            return self._nonfinite(step, "the gradient is not finite", record)
        cap_logit_scales(self.engine)
        self._consecutive_skips = 0
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            record["train/grad_norm"] = float(norm)
        record["train/skipped_steps"] = self.skipped_steps
        return record

    def _nonfinite(self, step: int, what: str, record: dict[str, float]) -> dict[str, float]:
        """Every rank arrives here at the same step (the decision came from a collective). Names the
        batch's sample keys on every rank; raises under `stop`, or after too many skips in a row."""
        keys = distributed.all_gather_object(self.batch_keys() if self.batch_keys is not None else [])
        named = [key for rank_keys in keys for key in rank_keys]
        sample = f"{', '.join(named[:8])}{f' and {len(named) - 8} more' if len(named) > 8 else ''}" or "unknown"
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self.s.nonfinite == "stop":
            raise NonFiniteLossError(
                f"{what} at step {step} (batch samples: {sample}); the last checkpoint is intact. Lower optim.lr "
                f"or trainer.grad_clip, check those samples, or set trainer.nonfinite=skip")
        if self._consecutive_skips > self.s.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{what} at step {step}: {self._consecutive_skips} non-finite steps in a row (trainer."
                f"max_consecutive_skips={self.s.max_consecutive_skips}); the last checkpoint is intact. Lower "
                f"optim.lr or trainer.grad_clip, or check the data (last batch samples: {sample})")
        if distributed.rank() == 0:
            log.warning("step %d skipped: %s (trainer.nonfinite=skip; %d skipped in all); batch samples: %s",
                        step, what, self.skipped_steps, sample)
        self.loggers.log({"step": step, "train/skipped_step": 1.0, "train/skipped_steps": self.skipped_steps,
                          "train/skipped_keys": named})
        return {**record, "train/skipped_steps": self.skipped_steps}

    def fit(self, start_step: int) -> int:
        """Returns the last step run; checkpoints at the end."""
        bar = self._progress(start_step)
        batches = iter(self.batches)
        try:
            step = step_last = start_step
            self._windows = 0
            self.times.restart()
            for step in range(start_step + 1, self.s.max_steps + 1):
                with self.times.phase("data_wait"):
                    batch = next(batches)
                record = self.train_step(batch, step)
                if bar is not None:
                    bar.update(1)
                if step % self.s.log_every_n_steps == 0 or step == self.s.max_steps:
                    record.update(self._close_window(step - step_last))
                    self._report(step_last + 1, step, record, bar)
                    step_last = step
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

    def _close_window(self, steps: int) -> dict[str, float]:
        """Throughput, lr, the time split (`StepTimes`) and data stats for a log window of `steps` steps."""
        times = self.times.close_window(steps)
        samples_per_s = self.s.global_batch_size / times["time/step_s"]
        record = {"train/samples_per_s": samples_per_s,
                  "train/samples_per_s_per_rank": samples_per_s / distributed.world_size(),
                  "train/lr": float(self.engine.get_lr()[0]), **times}
        if self.data_stats is not None:
            record.update(self.data_stats())
        return record

    def _report(self, first: int, step: int, record: dict[str, float], bar) -> None:
        """Logs the window `first..step`: to the metric sinks, and on rank 0 to the progress bar's
        postfix, or without a bar as a plain line (a batch job's log is not silent); warns once
        when waiting for data takes over `data_wait_warn_frac` of a window after the warm-up."""
        self.loggers.log({"step": step, **record})
        self._windows += 1
        if distributed.rank() != 0:
            return
        wait = record["time/data_wait_frac"]
        if bar is not None:
            # A dict, not keywords, which tqdm would sort by name.
            bar.set_postfix({"loss": f"{record['train/loss']:.4f}",
                             "samples/s": f"{record['train/samples_per_s']:.0f}", "data wait": f"{wait:.0%}"})
        else:
            eta = format_duration((self.s.max_steps - step) * record["time/step_s"])
            log.info("step %d/%d  loss %.4f  %.0f samples/s  lr %.3g  data wait %.0f%%  ETA %s", step,
                     self.s.max_steps, record["train/loss"], record["train/samples_per_s"], record["train/lr"],
                     100 * wait, eta)
        if (wait > self.s.data_wait_warn_frac and self._windows > DATA_WAIT_WARMUP_WINDOWS
                and not self._warned_data_wait):
            self._warned_data_wait = True
            log.warning("steps %d-%d spent %.0f%% of their time waiting for data (warning above %.0f%%, shown "
                        "once): the input pipeline holds training back; raise data.workers", first, step,
                        100 * wait, 100 * self.s.data_wait_warn_frac)
