"""The step loop on a fake engine, in one process without DeepSpeed: the cadence of logs,
checkpoints and evals, the preemption and non-finite stops, the batch iterator's close, the
time split in each log record, the plain log line of a run without a progress bar, the
data-wait warning, and the wall-clock time in each JSONL line."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch

from clipkit.loggers import JsonlLogger, MetricLoggers
from clipkit.trainer import NonFiniteLossError, StepTimes, Trainer, TrainerSettings, format_duration

PHASE_KEYS = ["time/data_wait_frac", "time/forward_frac", "time/backward_frac", "time/optimizer_frac"]


class FakeObjective:
    def __init__(self):
        self.on_step_calls: list[int] = []
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def parameters(self):
        return iter([self.weight])

    def modules(self):   # no LogitScale: the trainer's after-step cap has nothing to clamp
        return iter([self])

    def on_step(self, step: int) -> None:
        self.on_step_calls.append(step)


class FakeEngine:
    """The engine surface the trainer uses. `losses` maps a step to its loss (default 1.0);
    `sleep_s` maps a phase ("forward", "backward", "optimizer") to seconds it takes."""

    def __init__(self, losses: dict[int, float] | None = None, sleep_s: dict[str, float] | None = None,
                 raise_at: int | None = None, nan_grad_at: tuple[int, ...] = (), overflow_at: tuple[int, ...] = ()):
        """`nan_grad_at`: forwards whose backward leaves a NaN gradient (the plain fp32 engine);
        `overflow_at`: forwards whose step DeepSpeed's own optimizer skips (ZeRO 1-3, bf16)."""
        self.device = torch.device("cpu")
        self.module = FakeObjective()
        self.losses = losses or {}
        self.sleep_s = sleep_s or {}
        self.raise_at = raise_at
        self.nan_grad_at, self.overflow_at = nan_grad_at, overflow_at
        self.optimizer = type("TorchOptimizer", (), {})() if not overflow_at else type("ZeroOptimizer", (), {"overflow": False})()
        self.forwards = self.backwards = self.steps = 0
        self.updates: list[int] = []   # forwards whose step applied finite gradients
        self._applied = True

    def _take(self, phase: str) -> None:
        if self.sleep_s.get(phase):
            time.sleep(self.sleep_s[phase])

    def __call__(self, batch: dict):
        self.forwards += 1
        if self.forwards == self.raise_at:
            raise RuntimeError("boom")
        self._take("forward")
        return torch.tensor(self.losses.get(self.forwards, 1.0)), {"acc": torch.tensor(0.5)}

    def backward(self, loss: torch.Tensor) -> None:
        self.backwards += 1
        self.module.weight.grad = torch.full((3,), math.nan if self.forwards in self.nan_grad_at else 1.0)
        self._take("backward")

    def step(self) -> None:
        self.steps += 1
        grad = self.module.weight.grad
        self._applied = self.forwards not in self.overflow_at
        if self._applied and grad is not None:
            assert torch.isfinite(grad).all(), "a non-finite gradient reached the optimizer"
            self.updates.append(self.forwards)
        self.module.weight.grad = None
        self._take("optimizer")

    def was_step_applied(self) -> bool:
        return self._applied

    def get_global_grad_norm(self) -> float:
        return 1.7

    def get_lr(self) -> list[float]:
        return [1e-3]

    def train(self):
        return self

    def eval(self):
        return self


class Batches:
    """Both the iterable and its iterator; records `close()`. Sleeps `sleep_s` before each batch,
    or only before the first `slow_until` batches."""

    def __init__(self, sleep_s: float = 0.0, slow_until: int | None = None):
        self.sleep_s, self.slow_until = sleep_s, slow_until
        self.served = 0
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.sleep_s and (self.slow_until is None or self.served < self.slow_until):
            time.sleep(self.sleep_s)
        self.served += 1
        return {"image": torch.zeros(2, 3, 4, 4), "text": torch.zeros(2, 5, dtype=torch.long)}

    def close(self) -> None:
        self.closed = True


class FakeCheckpointer:
    def __init__(self):
        self.saved: list[tuple[int, dict]] = []

    def save(self, engine, step: int, client_state: dict) -> str:
        self.saved.append((step, client_state))
        return f"step_{step:08d}"


class ListSink:
    def __init__(self):
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


class FakeWatch:
    """A PreemptionWatch whose flag rises during the forward of step `at`."""

    def __init__(self, engine: FakeEngine, at: int):
        self.engine, self.at = engine, at

    @property
    def flag(self) -> float:
        return float(self.engine.forwards >= self.at)


def make_trainer(*, max_steps=10, log_every=3, ckpt_every=0, eval_every=0, progress_bar=False,
                 engine=None, batches=None, watch_at=None, sinks=None, warn_frac=0.2, nonfinite="stop",
                 max_skips=10):
    engine = engine or FakeEngine()
    batches = batches or Batches()
    checkpointer, sink = FakeCheckpointer(), ListSink()
    evals: list[int] = []

    def evaluate(step: int) -> dict[str, float]:
        evals.append(step)
        return {"eval/acc1": 0.5}

    settings = TrainerSettings(max_steps=max_steps, global_batch_size=8, log_every_n_steps=log_every,
                               checkpoint_every_n_steps=ckpt_every, eval_every_n_steps=eval_every,
                               progress_bar=progress_bar, data_wait_warn_frac=warn_frac, nonfinite=nonfinite,
                               max_consecutive_skips=max_skips)
    trainer = Trainer(engine, batches, settings, checkpointer=checkpointer,
                      loggers=MetricLoggers(sinks if sinks is not None else [sink]), evaluate=evaluate,
                      client_state=lambda step: {"step": step},
                      data_stats=lambda: {"data/epoch": 0},
                      preemption=FakeWatch(engine, watch_at) if watch_at is not None else None,
                      batch_keys=lambda: [f"shard.tar#{engine.forwards:04d}a", f"shard.tar#{engine.forwards:04d}b"])
    return trainer, engine, batches, checkpointer, sink, evals


def train_records(sink: ListSink) -> list[dict]:
    return [r for r in sink.records if "train/loss" in r]


@pytest.mark.parametrize("start_step, logged, saved, evaluated", [
    (0, [3, 6, 9, 10], [4, 8, 10], [5]),
    (4, [6, 9, 10], [8, 10], [5]),  # resumed after step 4: steps 5..10 only
])
def test_cadence_of_logs_checkpoints_and_evals(start_step, logged, saved, evaluated):
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=10, log_every=3, ckpt_every=4,
                                                               eval_every=5)
    assert trainer.fit(start_step) == 10
    assert [r["step"] for r in train_records(sink)] == logged
    assert [step for step, _ in ckpt.saved] == saved                  # every 4, and at the end
    assert [state for _, state in ckpt.saved] == [{"step": s} for s in saved]
    # Every 5 but not at the last step: the final eval is the caller's.
    assert evals == evaluated
    assert [r["step"] for r in sink.records if "eval/acc1" in r] == evaluated
    assert engine.module.on_step_calls == list(range(start_step + 1, 11))
    assert engine.forwards == engine.backwards == engine.steps == 10 - start_step
    assert trainer.preempted_at is None
    assert batches.closed


def test_preemption_checkpoints_at_the_flagged_step_and_stops():
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=10, eval_every=2, watch_at=4)
    assert trainer.fit(0) == 4
    assert trainer.preempted_at == 4
    assert [step for step, _ in ckpt.saved] == [4]
    assert engine.steps == 4                  # step 4 itself is completed before its checkpoint
    assert evals == [2]                       # no eval at the preempted step
    assert batches.closed


def test_a_flag_at_the_last_step_is_a_finished_run_not_a_preemption():
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=10, watch_at=10)
    assert trainer.fit(0) == 10
    assert trainer.preempted_at is None
    assert [step for step, _ in ckpt.saved] == [10]   # once, as the end-of-run checkpoint


def test_non_finite_loss_stops_before_backward_and_checkpoints_nothing_more():
    engine = FakeEngine(losses={3: math.nan})
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=10, ckpt_every=1, log_every=1,
                                                               engine=engine)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(batch samples: shard.tar#0003a, "
                                                 r"shard.tar#0003b\).*trainer.nonfinite=skip"):
        trainer.fit(0)
    assert engine.forwards == 3 and engine.backwards == engine.steps == 2
    assert [step for step, _ in ckpt.saved] == [1, 2]
    assert [r["step"] for r in train_records(sink)] == [1, 2]
    assert batches.served == 3
    assert batches.closed


def test_batch_iterator_is_closed_when_a_step_raises():
    trainer, engine, batches, ckpt, sink, evals = make_trainer(engine=FakeEngine(raise_at=2))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(0)
    assert batches.closed
    assert ckpt.saved == []


def test_every_log_record_splits_the_step_time():
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=7, log_every=3)
    trainer.fit(0)
    records = train_records(sink)
    assert [r["step"] for r in records] == [3, 6, 7]
    for r in records:
        fractions = [r[k] for k in PHASE_KEYS]
        assert all(0.0 <= f <= 1.0 for f in fractions), r
        assert sum(fractions) <= 1.0 + 1e-6
        assert sum(fractions) + r["time/other_frac"] == pytest.approx(1.0)
        assert r["time/step_s"] > 0
        assert r["train/samples_per_s"] == pytest.approx(8 / r["time/step_s"])
        assert r["train/samples_per_s_per_rank"] == pytest.approx(r["train/samples_per_s"])  # 1 rank
        assert r["train/lr"] == 1e-3 and r["data/epoch"] == 0


@pytest.mark.parametrize("phase", ["data_wait", "forward", "backward", "optimizer"])
def test_time_is_charged_to_the_phase_that_spends_it(phase):
    engine = FakeEngine(sleep_s={phase: 0.02})
    batches = Batches(sleep_s=0.02 if phase == "data_wait" else 0.0)
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=4, log_every=2, engine=engine,
                                                               batches=batches)
    trainer.fit(0)
    for r in train_records(sink):
        assert r[f"time/{phase}_frac"] > 0.5, r
        assert r["time/step_s"] >= 0.02


def test_cuda_timing_synchronizes_before_each_clock_read(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    times = StepTimes(synchronize=True)
    assert len(calls) == 1                       # the window's start
    with times.phase("forward"):
        pass
    assert len(calls) == 3                       # the phase's start and end
    times.close_window(1)
    assert len(calls) == 5                       # the window's end, and the next one's start
    monkeypatch.undo()
    assert make_trainer()[0].times.synchronize is False   # a CPU engine never synchronizes


def test_without_progress_bar_rank0_logs_a_plain_line_each_log_step(caplog):
    caplog.set_level(logging.INFO, logger="clipkit.trainer")
    trainer, *_ = make_trainer(max_steps=7, log_every=3, progress_bar=False)
    trainer.fit(0)
    lines = [r.getMessage() for r in caplog.records if r.name == "clipkit.trainer" and r.levelno == logging.INFO]
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]
    for line in lines:
        for part in ("loss 1.0000", "samples/s", "lr 0.001", "data wait", "ETA "):
            assert part in line, line
    assert lines[-1].endswith("ETA 0s")


def test_with_progress_bar_the_bar_shows_the_summary_and_there_is_no_plain_line(caplog, capsys):
    caplog.set_level(logging.INFO, logger="clipkit.trainer")
    trainer, *_ = make_trainer(max_steps=4, log_every=2, progress_bar=True)
    trainer.fit(0)
    assert not [r for r in caplog.records if r.name == "clipkit.trainer"]
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "4/4" in bar and "loss=1.0000, samples/s=" in bar and "data wait=" in bar


def test_a_data_bound_run_warns_once_naming_data_workers(caplog):
    caplog.set_level(logging.INFO, logger="clipkit.trainer")
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=8, log_every=2,
                                                               batches=Batches(sleep_s=0.05))
    trainer.fit(0)
    assert all(r["time/data_wait_frac"] > 0.5 for r in train_records(sink))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "data.workers" in warnings[0]
    assert warnings[0].startswith("steps 3-4 ")   # not drawn from the first (warm-up) window
    assert caplog.records[-1].name == "clipkit.trainer"


def test_a_slow_first_window_alone_does_not_warn(caplog):
    caplog.set_level(logging.WARNING, logger="clipkit.trainer")
    trainer, *_ = make_trainer(max_steps=8, log_every=2, batches=Batches(sleep_s=0.05, slow_until=2))
    trainer.fit(0)
    assert not caplog.records


def test_jsonl_lines_carry_the_wall_clock_time(tmp_path):
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    before = time.time()
    trainer, *_ = make_trainer(max_steps=6, log_every=2, eval_every=3, sinks=[jsonl])
    trainer.fit(0)
    jsonl.log({"step": 6, "time": 123.0})        # a record's own `time` wins
    jsonl.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 6]
    assert all(isinstance(r["time"], float) and before <= r["time"] <= time.time() for r in records[:-1])
    assert [r["time"] for r in records[:-1]] == sorted(r["time"] for r in records[:-1])
    assert records[-1]["time"] == 123.0


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (125, "2m05s"), (3599.6, "1h00m"),
                                           (3725, "1h02m"), (90061, "25h01m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_skip_drops_a_non_finite_loss_step_logs_its_samples_and_goes_on(caplog):
    engine = FakeEngine(losses={3: math.nan})
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=6, log_every=1, engine=engine,
                                                               nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="clipkit.trainer"):
        assert trainer.fit(0) == 6
    assert engine.forwards == 6 and engine.backwards == 5 and engine.updates == [1, 2, 4, 5, 6]
    skipped = [r for r in sink.records if r.get("train/skipped_step")]
    assert [(r["step"], r["train/skipped_keys"]) for r in skipped] == [(3, ["shard.tar#0003a", "shard.tar#0003b"])]
    assert train_records(sink)[-1]["train/skipped_steps"] == 1 and train_records(sink)[-1]["train/grad_norm"] == 1.7
    assert "step 3 skipped: loss is nan" in caplog.text and "shard.tar#0003a" in caplog.text


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_gradient_never_reaches_the_optimizer(policy):
    engine = FakeEngine(nan_grad_at=(4,))
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=6, log_every=1, engine=engine,
                                                               nonfinite=policy)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match=r"the gradient is not finite at step 4 \(batch samples: shard"):
            trainer.fit(0)
        assert engine.updates == [1, 2, 3]
    else:
        trainer.fit(0)
        assert engine.updates == [1, 2, 3, 5, 6] and trainer.skipped_steps == 1
    assert engine.steps == 4 if policy == "stop" else 6   # the skipped step still closes DeepSpeed's boundary


def test_a_step_deepspeed_skipped_for_overflow_counts_as_non_finite():
    engine = FakeEngine(overflow_at=(2,))
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=4, log_every=1, engine=engine,
                                                               nonfinite="skip")
    trainer.fit(0)
    assert engine.updates == [1, 3, 4] and [r["step"] for r in sink.records if r.get("train/skipped_step")] == [2]


def test_too_many_skips_in_a_row_stop_the_run():
    engine = FakeEngine(losses={2: math.nan, 3: math.inf, 4: math.nan, 6: math.nan})
    trainer, engine, batches, ckpt, sink, evals = make_trainer(max_steps=10, log_every=1, engine=engine,
                                                               nonfinite="skip", max_skips=2)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.fit(0)
    assert engine.forwards == 4 and engine.updates == [1]


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="trainer.nonfinite='ignore'"):
        make_trainer(nonfinite="ignore")
