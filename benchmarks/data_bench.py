"""Training-loader throughput and memory: clipkit's loader vs the plain webdataset recipe, same shards.

    python benchmarks/data_bench.py                            # 256 and 512 px, workers 0 1 2
    python benchmarks/data_bench.py --sizes 512 --workers 0 --samples 256
    python benchmarks/data_bench.py --pipelines clipkit,plain,clipkit_nodraft --out /tmp/data.json

Data: square JPEG crops of scikit-image's bundled photos (`pip install scikit-image`, the
`bench` extra), written at 1.25x the size into a folder with caption sidecars and turned into
shards by clipkit's shard writer (`write_rows`, 2 processes, `max_side` = 256 or 512):
the 256 px and 512 px square layouts that img2dataset produces for LAION-style sets.

Pipelines (each yields (images [B,3,224,224] float32, tokens [B,77] int64), open_clip's
ViT-B-32 train transform and tokenizer, shuffle buffer 1000, batch 32):
    plain            wds.WebDataset(urls).shuffle(1000).decode("pil").to_tuple("jpg", "txt")
                     .map_tuple(transform, tokenize).batched(32) in a DataLoader
                     (the canonical recipe; `.map_tuple` so it tokenizes like clipkit does)
    clipkit          clipkit.data.TrainLoader (JPEG draft decode on)
    clipkit_nodraft  the same with data.jpeg_draft=false, to separate the draft decode's share

Each (pipeline, size, workers) runs in its own subprocess, `--repeats` fresh pipelines in a
row, and the medians are reported. Samples/s is wall-clock, measured after the first
max(1, workers) batches (worker start-up excluded). CPU ms/sample is the user+system time of
the loader process and its workers over the same span: on a machine shared with other jobs
it is the steadier number, and for a CPU-bound loader its ratio is the throughput ratio an
idle machine would show. The printed ratios are speed (samples/s) and CPU efficiency
(plain's CPU per sample over the pipeline's) against plain at equal workers. Peak memory is the peak of the
summed PSS of the loader process and its workers, sampled every 0.1 s (PSS splits the pages
forked workers share, so the sum is not inflated). A cProfile of each pipeline at workers=0
on the largest size says where the time goes. Writes JSON to `--out`.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PIPELINES = ("plain", "clipkit", "clipkit_nodraft")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "cat", "colorwheel", "camera", "brick", "grass", "gravel")
BATCH, SHUFFLE, MODEL_INPUT = 32, 1000, 224


# -- data ------------------------------------------------------------------------------------

def write_source_folder(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` random square crops of the bundled photos as JPEG (quality 95) + caption sidecars."""
    import numpy as np
    import PIL.Image
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        photos.append((name, PIL.Image.fromarray(pixels).convert("RGB")))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name, photo = photos[i % len(photos)]
        short = min(photo.size)
        crop = int(short * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, photo.width - crop + 1)), int(rng.integers(0, photo.height - crop + 1))
        image = photo.crop((left, top, left + crop, top + crop)).resize((side, side), PIL.Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folder / f"{i:06d}.jpg", quality=95)
        (folder / f"{i:06d}.txt").write_text(f"a photo of the {name.replace('_', ' ')}, crop {i}")


def make_shards(root: Path, size: int, count: int) -> list[str]:
    """Shards of `count` `size` px JPEGs under root/<size>/train, written once and reused."""
    from clipkit.data.writer import rows_from_folder, write_rows

    out = root / str(size) / "train"
    if not (out / "stats.json").exists():
        src = root / str(size) / "src"
        write_source_folder(src, count, side=round(size * 1.25))
        write_rows(rows_from_folder(src), out, shard_size=max(1, count // 8), processes=2, max_side=size,
                   overwrite=True)
    return sorted(str(p) for p in out.glob("*.tar"))


# -- pipelines -------------------------------------------------------------------------------

def build_pipeline(name: str, urls: list[str], workers: int):
    """An iterable of (images [B,3,224,224], tokens [B,77]) batches (clipkit's batch dicts unpacked)."""
    import open_clip
    from torch.utils.data import DataLoader

    transform = open_clip.image_transform(MODEL_INPUT, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    if name == "plain":
        import webdataset as wds

        dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(SHUFFLE).decode("pil")
                   .to_tuple("jpg", "txt").map_tuple(transform, lambda text: tokenizer([text])[0]).batched(BATCH))
        return DataLoader(dataset, batch_size=None, num_workers=workers)
    from clipkit.data import Source, StreamSettings, TrainLoader

    settings = StreamSettings(batch_size=BATCH, streams_per_rank=max(1, workers), shuffle_buffer=SHUFFLE,
                              jpeg_draft=name != "clipkit_nodraft")
    loader = TrainLoader([Source("bench", tuple(urls))], settings, preprocess=transform, tokenize=tokenizer,
                         num_workers=workers, rank=0, world_size=1, seed=0)
    return ((batch["image"], batch["text"]) for batch in loader)


class PeakPss:
    """Samples the summed PSS (MiB) of this process and its children every `every` seconds."""

    def __init__(self, every: float = 0.1):
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        total = 0
        for proc in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return total / 2 ** 20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the dataloader workers)."""
    import psutil

    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except Exception:  # noqa: BLE001 - a worker that just exited
            pass
    return total


def measure(name: str, urls: list[str], workers: int, samples: int, repeats: int) -> dict:
    """Median over `repeats` fresh pipelines of wall samples/s and CPU ms per sample."""
    import statistics

    import torch

    torch.set_num_threads(1)
    rates, cpu_ms = [], []
    with PeakPss() as memory:
        for _ in range(repeats):
            batches = iter(build_pipeline(name, urls, workers))
            for _ in range(max(1, workers)):   # start-up: workers forked and their first batch decoded
                next(batches)
            t0, c0, seen = time.perf_counter(), cpu_seconds(), 0
            while seen < samples:
                images, tokens = next(batches)
                assert images.shape == (BATCH, 3, MODEL_INPUT, MODEL_INPUT) and tokens.shape == (BATCH, 77)
                seen += len(images)
            cpu = cpu_seconds() - c0
            rates.append(seen / (time.perf_counter() - t0))
            cpu_ms.append(1000 * cpu / seen)
            del batches
    return {"samples": seen, "repeats": repeats, "samples_per_s": round(statistics.median(rates), 1),
            "samples_per_s_all": [round(r, 1) for r in rates],
            "cpu_ms_per_sample": round(statistics.median(cpu_ms), 2), "peak_pss_mib": round(memory.peak, 1)}


# -- profile ---------------------------------------------------------------------------------

CATEGORIES = (  # (category, substrings of cProfile "file:function" labels), first match wins
    ("jpeg decode", ("'decode' of 'ImagingDecoder'", "ImageFile.py", "JpegImagePlugin", "Image.py:open")),
    ("resize / crop", ("'resize' of 'ImagingCore'", "'crop' of 'ImagingCore'", "'reduce' of 'ImagingCore'")),
    ("colour convert / copy", ("'convert' of 'ImagingCore'", "'copy' of 'ImagingCore'", "'encode' of")),
    ("batch stack", ("torch.stack", "collate")),
    ("tokenize", ("tokenizer.py", "_regex", "ftfy", "html")),
    ("augmentation RNG", ("get_params", "uniform_", "randint", "manual_seed", "random.py", "fork_rng")),
    ("to tensor + normalize", ("torch._C.TensorBase", "torch.tensor", "torch.as_tensor", "from_numpy",
                               "numpy.array", "_functional", "functional.py", "transforms.py", "tobytes")),
    ("tar read / shuffle", ("tarfile", "tar_reader", "'read' of '_io", "pread", "gopen", "tariterators",
                            "stream.py:_shuffled", "filters.py", "'readinto'")),
)


def profile(name: str, urls: list[str], samples: int) -> dict:
    import torch

    torch.set_num_threads(1)
    batches = iter(build_pipeline(name, urls, 0))
    next(batches)
    profiler = cProfile.Profile()
    profiler.enable()
    seen = 0
    while seen < samples:
        seen += len(next(batches)[0])
    profiler.disable()
    stats = pstats.Stats(profiler)
    totals = {category: 0.0 for category, _ in CATEGORIES} | {"other": 0.0}
    for (filename, _line, function), (_, _, tottime, _, _) in stats.stats.items():
        label = f"{Path(filename).name}:{function}" if filename != "~" else function
        category = next((c for c, keys in CATEGORIES if any(k in label for k in keys)), "other")
        totals[category] += tottime
    total = sum(totals.values())
    return {"total_s": round(total, 3), "share": {k: round(v / total, 3) for k, v in totals.items()}}


# -- driver ----------------------------------------------------------------------------------

def run_child(args: argparse.Namespace, **kw) -> dict:
    cmd = [sys.executable, __file__, "--data-dir", args.data_dir, "--images", str(args.images),
           "--repeats", str(args.repeats),
           *[f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pipelines", default="plain,clipkit,clipkit_nodraft")
    p.add_argument("--samples", type=int, default=512, help="samples timed per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per point; the median is reported")
    p.add_argument("--images", type=int, default=1024, help="images per size in the generated shards")
    p.add_argument("--profile-samples", type=int, default=256)
    p.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "clipkit_data_bench"))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_bench_cpu.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)   # "measure" | "profile"
    p.add_argument("--pipeline", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--nworkers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.data_dir)
    if args.child:
        urls = make_shards(root, args.size, args.images)
        result = (measure(args.pipeline, urls, args.nworkers, args.n, args.repeats) if args.child == "measure"
                  else profile(args.pipeline, urls, args.n))
        print(json.dumps(result))
        return

    pipelines = [name for name in args.pipelines.split(",") if name]
    for size in args.sizes:
        make_shards(root, size, args.images)
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "config": {"batch": BATCH, "shuffle": SHUFFLE, "model_input": MODEL_INPUT,
                               "samples": args.samples, "repeats": args.repeats, "images": args.images},
                    "runs": [], "ratios": [],
                    "profile": {}}
    print(f"{'size':>5} {'workers':>7} {'pipeline':>16} {'samples/s':>10} {'CPU ms/sample':>14} {'peak PSS MiB':>13}")
    for size in args.sizes:
        for workers in args.workers:
            row = {}
            for name in pipelines:
                result = run_child(args, child="measure", pipeline=name, size=size, nworkers=workers, n=args.samples)
                row[name] = result
                report["runs"].append({"size": size, "workers": workers, "pipeline": name, **result})
                print(f"{size:>5} {workers:>7} {name:>16} {result['samples_per_s']:>10.1f} "
                      f"{result['cpu_ms_per_sample']:>14.2f} {result['peak_pss_mib']:>13.1f}", flush=True)
            if "plain" in row:
                for name in (n for n in row if n != "plain"):
                    ratio = row[name]["samples_per_s"] / row["plain"]["samples_per_s"]
                    cpu = row["plain"]["cpu_ms_per_sample"] / row[name]["cpu_ms_per_sample"]
                    memory = row[name]["peak_pss_mib"] / row["plain"]["peak_pss_mib"]
                    report["ratios"].append({"size": size, "workers": workers, "pipeline": name,
                                             "speed_vs_plain": round(ratio, 2), "cpu_efficiency_vs_plain": round(cpu, 2),
                                             "memory_vs_plain": round(memory, 2)})
                    print(f"{'':>5} {'':>7} {name + ' vs plain':>16} {ratio:>9.2f}x {cpu:>13.2f}x {memory:>12.2f}x",
                          flush=True)
    size = max(args.sizes)
    print(f"\nwhere the time goes at workers=0, {size} px (share of profiled time):")
    for name in pipelines:
        result = run_child(args, child="profile", pipeline=name, size=size, n=args.profile_samples)
        report["profile"][f"{name}@{size}"] = result
        shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(result["share"].items(), key=lambda kv: -kv[1]) if v)
        print(f"  {name:>16}: {shares}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
