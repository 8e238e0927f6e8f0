"""Training throughput side by side: `clipkit-train` against `python -m open_clip_train.main`.

    python benchmarks/train_bench.py --make-venv                  # once: .bench-venv/ (or `make bench-venv`)
    python benchmarks/train_bench.py                              # tiny ViT on digits, 1 process, 3 alternations
    python benchmarks/train_bench.py --cases tiny --procs 2 --repeats 2
    python benchmarks/train_bench.py --cases vitb32 --procs 1 --repeats 2
    python benchmarks/train_bench.py --device cuda --precision bf16 --cases vitb32 --batch 256 --steps 64 --workers 8
    git archive HEAD~1 clipkit conf | tar -x -C /tmp/clipkit-before   # a change's before/after, interleaved:
    python benchmarks/train_bench.py --trainers clipkit,open_clip,clipkit@/tmp/clipkit-before

Both trainers get the same model, shards, global batch, dataloader workers, precision, steps,
seed, lr schedule (cosine, same warmup), AdamW settings (lr, weight decay, betas, eps, the same
no-decay groups), gradient clipping at 1.0 and number of processes (`torchrun` for both when
`--procs 2`). Nothing is evaluated during the run; each saves one checkpoint, after the last
step. Both log every step. clipkit runs from this checkout with the project's Python;
open_clip_train runs in `.bench-venv/`, which holds only webdataset 0.2.86 and pandas (what
open_clip_train needs and the project's environment lacks) and reads torch and open_clip from
the project's `.venv` through a `.pth` line placed after its own site-packages.

Cases:
  tiny    conf/model/tiny_vit.yaml (2-layer ViT at 32 px + 2-layer text transformer); for
          open_clip_train the same config is written as `open_clip_config.json` in a folder and
          passed as `--model local-dir:<folder>`. Data: sklearn's digits (`clipkit-shards digits`),
          1,437 samples in 8 shards. Batch 128, 150 steps, warmup 10.
  vitb32  open_clip's ViT-B-32 (random init) on synthetic 256 px JPEG shards written by clipkit's
          shard writer (512 images, 16 shards). Batch 32, 30 steps, warmup 5.

Per run: steady-state samples/s over the steps after `--skip` (from per-step times: clipkit's
`time/step_s` records in metrics.jsonl, open_clip_train's `Batch (t)` log lines), the data-wait
share of those steps (clipkit `time/data_wait_frac`; open_clip_train `Data (t)` / `Batch (t)`),
CPU seconds per step of the whole process tree over the same steps (on a shared machine the
steadier number), peak RSS of the process tree (the sum over the launcher, ranks and data
workers, sampled every 0.1 s; and the largest single process), start-up (launch to the end of
step 1), total wall time, and the loss: at the last step and the mean of the last 10 steps.
clipkit logs the global-batch loss; open_clip_train logs rank 0's loss (its rows of the global
logits), the same in expectation. Runs alternate clipkit, open_clip_train, clipkit, ... for
`--repeats` rounds; medians and raw values go to `--out` (merged by case and process count into
an existing file), with the load average before and after each run. A trainer `clipkit@DIR` runs
clipkit from another source tree (a folder holding `clipkit/` and `conf/`) in the same rotation.

On a GPU (`--device cuda`) each run also records the device's peak used memory (nvidia-smi,
sampled every 0.25 s: everything on the GPU, the CUDA context included, for both trainers alike).
`--side-path DIR` replaces the side venv where none can be built (the GPU machine: no network,
a system Python): open_clip_train then runs with this Python and DIR first on PYTHONPATH, DIR
holding webdataset 0.2.86 (benchmarks/gpu_wheels.py installs it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BENCH_VENV = REPO / ".bench-venv"
# open_clip_train needs these and the project's environment does not have them (webdataset 1.x
# breaks its pipeline with KeyError: 'fname').
SIDE_PACKAGES = ("webdataset<=0.2.86", "pandas")
# clipkit's conf/optim/adamw.yaml; open_clip_train's own defaults depend on "vit" in the model name.
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 5e-4, 0.2, (0.9, 0.98), 1e-6, 1.0


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    steps: int
    warmup: int
    skip: int


CASES = {"tiny": Case("tiny", batch=128, steps=150, warmup=10, skip=20),
         "vitb32": Case("vitb32", batch=32, steps=30, warmup=5, skip=5)}


# -- the side environment --------------------------------------------------------------------

def site_dirs(python: str) -> list[str]:
    """The site-packages folders of `python`'s environment, its own first (a venv: one or two;
    a system Python: also the dist-packages and user site folders)."""
    code = ("import site, sysconfig; p = sysconfig.get_paths(); "
            "user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []; "
            "dirs = [p['purelib'], p['platlib'], *getattr(site, 'getsitepackages', lambda: [])(), *user]; "
            "print('\\n'.join(dict.fromkeys(dirs)))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return [d for d in out.splitlines() if d and Path(d).is_dir()]


def make_venv(venv: Path, main_python: str, wheels: str | None = None) -> Path:
    """Creates `venv` with webdataset 0.2.86 and pandas; torch and open_clip come from `main_python`'s
    environment through a .pth line that sorts after the venv's own site-packages, so its
    webdataset shadows the main one. Shared dependencies (numpy, PyYAML) are pinned to the main
    environment's versions. Never touches the main environment. Returns the venv's python."""
    python = venv / "bin" / "python"
    subprocess.run([main_python, "-m", "venv", "--clear", str(venv)], check=True)
    freeze = subprocess.run([main_python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    pins = [line for line in freeze.splitlines()
            if re.match(r"^[A-Za-z0-9_.-]+==", line) and line.split("==")[0].lower() not in ("webdataset", "pandas")]
    constraints = venv / "main-venv-constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    source = ["--no-index", "--find-links", wheels] if wheels else []
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *source, *SIDE_PACKAGES, "-c", str(constraints)],
                   check=True)
    # Lines of a .pth file are appended to sys.path after the folder that holds it.
    Path(site_dirs(str(python))[0], "zz_clipkit_main_venv.pth").write_text("\n".join(site_dirs(main_python)) + "\n")
    check = subprocess.run([str(python), "-c", "import webdataset, torch, open_clip, pandas, open_clip_train.main; "
                            "print(webdataset.__version__, torch.__version__, open_clip.__version__)"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check.returncode != 0:
        raise SystemExit(f"the side venv {venv} does not import open_clip_train:\n{check.stderr[-2000:]}")
    wds, torch_version, open_clip_version = check.stdout.split()[-3:]
    print(f"{venv}: webdataset {wds}, torch {torch_version}, open_clip {open_clip_version}")
    return python


# -- data and model config -------------------------------------------------------------------

def digits_shards(root: Path) -> tuple[str, int]:
    """sklearn's digits as shards (written once): (brace pattern of the train shards, shard count)."""
    out = root / "digits"
    if not (out / "train" / "nshards.txt").exists():
        from clipkit.data.digits import write_digits_shards

        write_digits_shards(out, overwrite=True)
    count = len(list((out / "train").glob("*.tar")))
    return f"{out}/train/{{00000..{count - 1:05d}}}.tar", count


def synthetic_jpeg_shards(root: Path, count: int = 512, shard_size: int = 32, side: int = 256) -> tuple[str, int]:
    """`count` smooth random colour fields with noise, JPEG q90 at 1.25x `side`, written by clipkit's
    shard writer at `max_side=side` (written once): (brace pattern, shard count)."""
    import numpy as np
    import PIL.Image

    from clipkit.data.writer import rows_from_folder, write_rows

    out = root / f"synthetic{side}" / "train"
    if not (out / "stats.json").exists():
        src = root / f"synthetic{side}" / "src"
        src.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        colours = ("red", "green", "blue", "yellow", "purple", "orange", "grey", "cyan")
        big = round(side * 1.25)
        for i in range(count):
            coarse = PIL.Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            field = np.asarray(coarse.resize((big, big), PIL.Image.BICUBIC), dtype=np.float32)
            field += rng.normal(0, 12, field.shape)
            PIL.Image.fromarray(field.clip(0, 255).astype(np.uint8)).save(src / f"{i:06d}.jpg", quality=90)
            (src / f"{i:06d}.txt").write_text(f"a synthetic {colours[i % len(colours)]} picture, number {i}")
        write_rows(rows_from_folder(src), out, shard_size=shard_size, processes=2, max_side=side, overwrite=True)
        shutil.rmtree(src)
    count = len(list(out.glob("*.tar")))
    return f"{out}/{{00000..{count - 1:05d}}}.tar", count


def tiny_model_dir(root: Path) -> Path:
    """conf/model/tiny_vit.yaml's inline config as an open_clip `local-dir:` folder."""
    import yaml

    spec = yaml.safe_load((REPO / "conf" / "model" / "tiny_vit.yaml").read_text())
    folder = root / "models" / spec["name"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": spec["config"], "preprocess_cfg": {}},
                                                             indent=2))
    return folder


# -- commands ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """Everything both trainers share for one (case, process count)."""

    case: Case
    procs: int
    urls: str
    clipkit_model: tuple[str, ...]
    open_clip_model: str
    workers: int
    precision: str          # fp32 | bf16
    device: str             # cpu | cuda
    seed: int = 0


def _launcher(python: str, procs: int) -> list[str]:
    if procs == 1:
        return [python]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]


def clipkit_command(s: Setup, python: str, out_dir: Path, name: str) -> list[str]:
    c = s.case
    return [*_launcher(python, s.procs), "-m", "clipkit.train", *s.clipkit_model, "data=webdataset",
            f"data.train_urls='{s.urls}'", f"data.global_batch_size={c.batch}", f"data.workers={s.workers}",
            "data.shuffle_buffer=1000", "eval=none", f"trainer.max_steps={c.steps}", f"trainer.precision={s.precision}",
            f"trainer.grad_clip={GRAD_CLIP}", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=0",
            "trainer.progress_bar=false", "trainer.export_open_clip=false", "sched=cosine",
            f"sched.warmup_steps={c.warmup}", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
            f"optim.betas=[{BETAS[0]},{BETAS[1]}]", f"optim.eps={EPS}", f"seed={s.seed}", f"run_name={name}",
            f"paths.output_dir={out_dir}"]


def open_clip_command(s: Setup, python: str, out_dir: Path, name: str) -> list[str]:
    c = s.case
    per_rank = c.batch // s.procs
    # One epoch of exactly `steps` batches: num_batches = ceil(N / global batch), rounded up to a
    # multiple of the workers, so N = steps x global batch with steps divisible by the workers.
    precision = {"fp32": "fp32", "bf16": "amp_bf16"}[s.precision]
    return [*_launcher(python, s.procs), "-m", "open_clip_train.main", "--model", s.open_clip_model,
            "--train-data", s.urls, "--dataset-type", "webdataset", "--train-num-samples", str(c.steps * c.batch),
            "--batch-size", str(per_rank), "--epochs", "1", "--workers", str(s.workers), "--precision", precision,
            "--lr", str(LR), "--wd", str(WEIGHT_DECAY), "--warmup", str(c.warmup), "--lr-scheduler", "cosine",
            "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]), "--eps", str(EPS), "--grad-clip-norm", str(GRAD_CLIP),
            "--seed", str(s.seed), "--log-every-n-steps", "1", "--zeroshot-frequency", "0", "--save-frequency", "1",
            "--name", name, "--device", s.device]   # logs to ./logs/<name>: run in out_dir (see run_once)


# -- one run -----------------------------------------------------------------------------------

class TreeMonitor:
    """Samples the process tree under `pid` every `every` s: (time, CPU s, summed RSS, largest RSS)."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.root, self.every, self.samples = psutil.Process(pid), every, []
        self.peak_rss = self.peak_rss_one = 0
        self._stop = threading.Event()
        self._cpu_done: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        cpu, rss, rss_one = 0.0, 0, 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except Exception:  # noqa: BLE001 - the tree just exited
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    t, m = proc.cpu_times(), proc.memory_info().rss
            except Exception:  # noqa: BLE001 - a process that just exited
                continue
            # Keep each process's last value: a data worker that exits must not make CPU time go back.
            self._cpu_done[proc.pid] = t.user + t.system
            rss += m
            rss_one = max(rss_one, m)
        cpu = sum(self._cpu_done.values())
        self.samples.append((time.time(), cpu, rss))
        self.peak_rss, self.peak_rss_one = max(self.peak_rss, rss), max(self.peak_rss_one, rss_one)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, t: float) -> float:
        """CPU seconds of the tree at wall time `t`, interpolated between samples."""
        times = [s[0] for s in self.samples]
        import bisect

        i = bisect.bisect_left(times, t)
        if i == 0:
            return self.samples[0][1]
        if i >= len(times):
            return self.samples[-1][1]
        (t0, c0, _), (t1, c1, _) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


class GpuMemoryMonitor:
    """Peak used memory of the GPU (MiB, nvidia-smi), sampled every `every` s while running."""

    def __init__(self, every: float = 0.25):
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        self.cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index]
        self.every, self.peak_mib = every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(self.cmd, capture_output=True, text=True).stdout.strip()
            try:
                self.peak_mib = max(self.peak_mib, float(out.splitlines()[0]))
            except (ValueError, IndexError):  # "[N/A]" or nothing: keep the samples that parsed
                pass
            self._stop.wait(self.every)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def launch(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path = REPO,
           gpu: GpuMemoryMonitor | None = None) -> tuple[int, list[tuple[float, str]], TreeMonitor, float, float]:
    """Runs `cmd` in `cwd`, timestamping each output line as it arrives. -> (rc, lines, monitor, start, end)."""
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    monitor = TreeMonitor(proc.pid)
    monitor.start()
    if gpu is not None:
        gpu.start()
    lines = []
    with log_path.open("w") as log:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            log.write(line)
    rc = proc.wait()
    end = time.time()
    monitor.stop()
    if gpu is not None:
        gpu.stop()
    return rc, lines, monitor, start, end


@dataclass
class Step:
    step: int
    end: float          # wall time at the end of the step (unix s)
    seconds: float      # the step's wall time
    data_wait: float    # seconds of it spent waiting for the batch
    loss: float


OPEN_CLIP_LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ .*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),"
                            r".*? Loss: ([\d.]+) \(")


def clipkit_steps(metrics: Path) -> list[Step]:
    """One record per step (trainer.log_every_n_steps=1) from metrics.jsonl."""
    steps = []
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "time/step_s" in r:
            steps.append(Step(r["step"], r["time"], r["time/step_s"], r["time/data_wait_frac"] * r["time/step_s"],
                              r["train/loss"]))
    return steps


def clipkit_split(metrics: Path, skip: int) -> dict[str, float]:
    """clipkit's own step split (`time/*_frac`), step-time weighted over the steps after `skip`."""
    sums: dict[str, float] = {}
    total = 0.0
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "time/step_s" in r and r["step"] > skip:
            total += r["time/step_s"]
            for k, v in r.items():
                if k.startswith("time/") and k.endswith("_frac"):
                    sums[k[5:-5]] = sums.get(k[5:-5], 0.0) + v * r["time/step_s"]
    return {k: round(v / total, 4) for k, v in sums.items()}


def open_clip_steps(lines: list[tuple[float, str]], global_batch: int) -> list[Step]:
    """One log line per step (--log-every-n-steps 1), timed when it reached us."""
    steps = []
    for t, line in lines:
        m = OPEN_CLIP_LINE.search(line)
        if m:
            samples, data_t, batch_t, loss = int(m[1]), float(m[2]), float(m[3]), float(m[4])
            steps.append(Step(samples // global_batch, t, batch_t, data_t, loss))
    return steps


def summarize(steps: list[Step], monitor: TreeMonitor, start: float, end: float, case: Case) -> dict:
    timed = [s for s in steps if s.step > case.skip]
    if not timed or steps[-1].step != case.steps:
        raise RuntimeError(f"expected {case.steps} logged steps, got {len(steps)}")
    seconds = sum(s.seconds for s in timed)
    first_end = next((s.end for s in steps if s.step == case.skip), start)
    cpu = monitor.cpu_at(steps[-1].end) - monitor.cpu_at(first_end)
    last10 = [s.loss for s in steps[-10:]]
    return {"samples_per_s": case.batch * len(timed) / seconds,
            "step_s": seconds / len(timed),
            "data_wait_frac": sum(s.data_wait for s in timed) / seconds,
            "cpu_s_per_step": cpu / len(timed),
            "cores_busy": cpu / max(steps[-1].end - first_end, 1e-9),
            "peak_rss_mib": monitor.peak_rss / 2**20, "peak_rss_one_process_mib": monitor.peak_rss_one / 2**20,
            "startup_s": steps[0].end - start, "wall_s": end - start,
            "final_loss": steps[-1].loss, "last10_loss_mean": statistics.fmean(last10),
            "last10_loss_std": statistics.pstdev(last10), "timed_steps": len(timed)}


def run_once(trainer: str, s: Setup, pythons: dict[str, str], work: Path, tag: str,
             side_path: str | None = None) -> dict:
    out_dir = work / "runs"
    name = f"{s.case.name}-{s.procs}p-{re.sub(r'[^A-Za-z0-9_]+', '_', trainer)}-{tag}"
    shutil.rmtree(out_dir / name, ignore_errors=True)
    shutil.rmtree(out_dir / "logs" / name, ignore_errors=True)   # open_clip_train refuses an existing one
    out_dir.mkdir(parents=True, exist_ok=True)
    kind, _, source = trainer.partition("@")
    build = clipkit_command if kind == "clipkit" else open_clip_command
    cmd = build(s, pythons[kind], out_dir, name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kind == "clipkit":
        env["PYTHONPATH"] = os.pathsep.join([source or str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    elif side_path:  # webdataset 0.2.86 ahead of clipkit's 1.x
        env["PYTHONPATH"] = os.pathsep.join([side_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    gpu = GpuMemoryMonitor() if s.device == "cuda" and shutil.which("nvidia-smi") else None
    load_before = os.getloadavg()
    # open_clip_train writes under --logs (default ./logs/); the flag is not passed because torchrun's
    # own parser (torch >= 2.9) rejects "--logs" anywhere on its command line as an ambiguous
    # abbreviation of its --logs-specs, so open_clip_train runs in out_dir instead.
    rc, lines, monitor, start, end = launch(cmd, env, work / "runs" / f"{name}.log",
                                            cwd=REPO if kind == "clipkit" else out_dir, gpu=gpu)
    if rc != 0:
        tail = "\n".join(line for _, line in lines[-40:])
        raise RuntimeError(f"{trainer} exited with {rc}: {' '.join(cmd)}\n{tail}")
    if kind == "clipkit":
        metrics = out_dir / name / "metrics.jsonl"
        steps = clipkit_steps(metrics)
        extra = {"split": clipkit_split(metrics, s.case.skip)}
    else:
        steps = open_clip_steps(lines, s.case.batch)
        extra = {}
    result = summarize(steps, monitor, start, end, s.case)
    result.update(extra, load_before=[round(x, 2) for x in load_before],
                  load_after=[round(x, 2) for x in os.getloadavg()])
    if gpu is not None:
        result["peak_gpu_mib"] = gpu.peak_mib
    shutil.rmtree(out_dir / name, ignore_errors=True)   # the checkpoints (ViT-B-32: about 1.8 GB each)
    shutil.rmtree(out_dir / "logs" / name, ignore_errors=True)
    result["command"] = cmd
    return result


# -- report ------------------------------------------------------------------------------------

METRICS = ("samples_per_s", "data_wait_frac", "cpu_s_per_step", "peak_rss_mib", "peak_rss_one_process_mib",
           "startup_s", "wall_s", "final_loss", "last10_loss_mean")


def medians(runs: list[dict]) -> dict[str, float]:
    keys = METRICS + (("peak_gpu_mib",) if all("peak_gpu_mib" in r for r in runs) else ())
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def ratios(ck: dict[str, float], oc: dict[str, float]) -> dict[str, float]:
    """clipkit / open_clip_train of each median (samples/s: higher is better; the rest: lower)."""
    keys = ("samples_per_s", "cpu_s_per_step", "peak_rss_mib", "peak_rss_one_process_mib", "startup_s", "wall_s",
            "peak_gpu_mib")
    return {k: ck[k] / oc[k] for k in keys if k in ck and k in oc and oc[k]}


def print_point(key: str, runs: dict[str, list[dict]], med: dict[str, dict], rat: dict[str, dict[str, float]]) -> None:
    print(f"\n== {key}")
    print(f"{'trainer':>10} {'samples/s':>10} {'data wait':>9} {'CPU s/step':>10} {'RSS MiB':>8} {'1-proc':>7} "
          f"{'start s':>7} {'wall s':>7} {'loss':>7} {'last10':>7}  load(1m) before")
    for trainer in runs:
        for r in runs[trainer]:
            print(f"{trainer:>10} {r['samples_per_s']:>10.1f} {r['data_wait_frac']:>9.1%} {r['cpu_s_per_step']:>10.3f} "
                  f"{r['peak_rss_mib']:>8.0f} {r['peak_rss_one_process_mib']:>7.0f} {r['startup_s']:>7.1f} "
                  f"{r['wall_s']:>7.1f} {r['final_loss']:>7.4f} {r['last10_loss_mean']:>7.4f}  "
                  f"{r['load_before'][0]:.2f}")
        m = med[trainer]
        print(f"{'median':>10} {m['samples_per_s']:>10.1f} {m['data_wait_frac']:>9.1%} {m['cpu_s_per_step']:>10.3f} "
              f"{m['peak_rss_mib']:>8.0f} {m['peak_rss_one_process_mib']:>7.0f} {m['startup_s']:>7.1f} "
              f"{m['wall_s']:>7.1f} {m['final_loss']:>7.4f} {m['last10_loss_mean']:>7.4f}")
    for label, q in rat.items():
        print(f"{'ratio':>10} {q['samples_per_s']:>9.2f}x {'':>9} {q['cpu_s_per_step']:>9.2f}x "
              f"{q['peak_rss_mib']:>7.2f}x {q['peak_rss_one_process_mib']:>6.2f}x {q['startup_s']:>6.2f}x "
              f"{q['wall_s']:>6.2f}x   ({label} / open_clip_train)")
    for trainer, m in med.items():
        if "peak_gpu_mib" in m:
            ratio = next((f", {q['peak_gpu_mib']:.2f}x open_clip_train" for label, q in rat.items()
                          if label == trainer and "peak_gpu_mib" in q), "")
            print(f"{trainer} peak GPU memory (median): {m['peak_gpu_mib']:.0f} MiB{ratio}")
    for label in (t for t in runs if t.startswith("clipkit")):
        split = [r["split"] for r in runs[label]]
        print(f"{label} step split (median): " + ", ".join(f"{k} {statistics.median(x[k] for x in split):.1%}"
                                                         for k in split[0]))


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    import torch

    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["tiny"], choices=sorted(CASES))
    p.add_argument("--procs", type=int, nargs="+", default=[1], help="processes (torchrun for both when > 1)")
    p.add_argument("--repeats", type=int, default=3, help="clipkit / open_clip_train alternations")
    p.add_argument("--steps", type=int, help="override the case's steps")
    p.add_argument("--batch", type=int, help="override the case's global batch")
    p.add_argument("--skip", type=int, help="override the case's steps left out of the steady state")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per process, both trainers")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: clipkit trainer.precision=bf16, open_clip_train --precision amp_bf16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--trainers", default="clipkit,open_clip")
    p.add_argument("--workdir", default=str(REPO / "outputs" / "train_bench"), help="shards and run folders")
    p.add_argument("--venv", default=str(BENCH_VENV), help="open_clip_train's side venv")
    p.add_argument("--make-venv", action="store_true", help="(re)build --venv, then exit")
    p.add_argument("--wheels", help="with --make-venv: install from this wheel folder only (no index)")
    p.add_argument("--keep-going", action="store_true",
                   help="a trainer whose run fails is left out of the later rounds (its error kept in the JSON); "
                        "the others go on")
    p.add_argument("--side-path", help="instead of --venv: run open_clip_train with this Python and DIR (holding "
                                       "webdataset 0.2.86) first on PYTHONPATH")
    p.add_argument("--out", help="JSON results (default benchmarks/results/train_bench_<device>.json)")
    args = p.parse_args()
    if args.make_venv:
        make_venv(Path(args.venv), sys.executable, args.wheels)
        return
    trainers = [t for t in args.trainers.split(",") if t]
    if args.steps and args.steps % args.workers:
        # open_clip_train rounds its epoch up to a multiple of the workers (and would run longer).
        raise SystemExit(f"--steps {args.steps} must be a multiple of --workers {args.workers}")
    side_python = sys.executable if args.side_path else str(Path(args.venv) / "bin" / "python")
    if any(t not in ("clipkit", "open_clip") and not t.startswith("clipkit@") for t in trainers):
        raise SystemExit(f"--trainers {args.trainers}: use clipkit, open_clip and clipkit@<source tree>")
    if "open_clip" in trainers and not Path(side_python).exists():
        raise SystemExit(f"{side_python} not found: run `python benchmarks/train_bench.py --make-venv` first")
    if args.device == "cpu" and any(p > 1 for p in args.procs) and "open_clip" in trainers:
        # open_clip_train/main.py always wraps the model as DistributedDataParallel(model, device_ids=[device]);
        # torch refuses device_ids for a CPU module, so open_clip_train cannot train in 2 CPU processes.
        raise SystemExit("open_clip_train cannot run several CPU processes (it passes device_ids=[cpu] to "
                         "DistributedDataParallel, which torch rejects): use --device cuda, or --trainers clipkit")
    pythons = {"clipkit": sys.executable, "open_clip": side_python}
    work = Path(args.workdir)
    data = work / "data"
    out = Path(args.out) if args.out else RESULTS / f"train_bench_{device_name(args.device)}.json"
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update(machine=machine(), device=args.device)
    points = report.setdefault("points", {})
    for case_name in args.cases:
        base = CASES[case_name]
        case = Case(base.name, args.batch or base.batch, args.steps or base.steps, base.warmup,
                    args.skip if args.skip is not None else base.skip)
        if case.name == "tiny":
            urls, shards = digits_shards(data)
            clipkit_model, open_clip_model = ("model=tiny_vit",), f"local-dir:{tiny_model_dir(work)}"
        else:
            urls, shards = synthetic_jpeg_shards(data, count=max(512, 4 * case.batch))
            clipkit_model, open_clip_model = ("model=ViT-B-32",), "ViT-B-32"
        for procs in args.procs:
            setup = Setup(case, procs, urls, clipkit_model, open_clip_model, args.workers, args.precision, args.device)
            key = f"{case.name}/{procs}p/{args.precision}"
            runs: dict[str, list[dict]] = {t: [] for t in trainers}
            failed: dict[str, str] = {}
            for r in range(args.repeats):
                for trainer in [t for t in trainers if t not in failed]:
                    try:
                        result = run_once(trainer, setup, pythons, work, f"r{r}", args.side_path)
                    except RuntimeError as err:
                        if not args.keep_going:
                            raise
                        # The other trainer's numbers are still worth having (a GPU run is minutes long).
                        failed[trainer] = str(err)[-3000:]
                        print(f"  {key} {trainer} r{r} FAILED, left out from here on:\n{failed[trainer]}", flush=True)
                        continue
                    runs[trainer].append(result)
                    gpu = f", GPU peak {result['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in result else ""
                    print(f"  {key} {trainer} r{r}: {result['samples_per_s']:.1f} samples/s, "
                          f"{result['cpu_s_per_step']:.3f} CPU s/step, loss {result['final_loss']:.4f}, "
                          f"load {result['load_before'][0]:.2f}{gpu}", flush=True)
            runs = {t: v for t, v in runs.items() if v}
            if not runs:
                raise SystemExit(f"every trainer failed at {key}")
            med = {t: medians(runs[t]) for t in runs}
            rat = ({t: ratios(med[t], med["open_clip"]) for t in runs if t.startswith("clipkit")}
                   if "open_clip" in runs else {})
            print_point(key, runs, med, rat)
            points[key] = {"case": {**case.__dict__, "shards": shards, "urls": urls, "workers": args.workers,
                                    "procs": procs, "precision": args.precision, "repeats": args.repeats,
                                    "order": "alternating " + " / ".join(trainers)},
                           "runs": runs, "medians": med, "ratios_over_open_clip": rat, "failed": failed,
                           "loadavg_end": list(os.getloadavg())}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
