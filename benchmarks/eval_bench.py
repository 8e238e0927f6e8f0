"""Exact and approximate top-k retrieval at eval scale: clipkit's exact search vs FAISS and torch.

Workload (issue 5): a gallery of N x 512 float32 unit vectors (default N = 1,000,000),
10,000 unit queries, top-10. Every method runs in its own subprocess so its peak RSS is its
own; the gallery is regenerated there from a seeded RNG in chunks. The target is exact
search in <= 60 s on the 2-core CPU with peak memory <= 2x the gallery.

    python benchmarks/eval_bench.py --methods clipkit_exact,faiss_flat,torch_chunked,full_matrix
    python benchmarks/eval_bench.py --gallery 200000 --methods clipkit_exact,ivf_flat,hnsw
    python benchmarks/eval_bench.py --gallery 100000      # a quick check of everything

Methods:
    clipkit_exact  clipkit.eval.search.topk_inner_product, the CPU default: the certified
                   int8-filter + float64 search (clipkit.eval.certified); the reference the
                   others' recall is measured against
    faiss_flat     the same function with method="faiss": IndexFlatIP's BLAS search per
                   gallery chunk, merged heap
    torch_chunked  torch matmul + topk per gallery chunk, merged
    clipkit_ranks  what eval `index: flat` retrieval runs per direction: the exact pessimistic
                   rank of each query's correct item over the whole gallery
                   (clipkit.eval.metrics.positive_ranks, float32 GEMM chunks), which gives
                   recall@k, mean and median rank. Query i's correct item is the (i mod k + 1)-th
                   hit of clipkit_exact's top-k, so every rank is known: the check is exact.
    full_matrix    CLIP_benchmark's approach: the whole [Q, N] score matrix, then topk
                   (only run when it fits in memory; reported as "does not fit" otherwise)
    ivf_flat, hnsw clipkit.eval.search.build_index; build and search times, recall@k vs exact

Each result has `seconds_over_clipkit_exact` and the load average seen around it (the
machine is shared: compare methods from one run). Writes benchmarks/results/eval_bench_cpu.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("clipkit_exact", "faiss_flat", "torch_chunked", "clipkit_ranks", "full_matrix", "ivf_flat", "hnsw")


def unit_rows(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """[n, dim] float32 L2-normalized Gaussian rows, generated chunk by chunk (peak = result + one chunk)."""
    out = np.empty((n, dim), np.float32)
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + len(block)] = block
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def torch_chunked_topk(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 16384):
    import torch
    q = torch.from_numpy(queries)
    best_s = torch.full((len(q), k), -float("inf"))
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for s in range(0, len(gallery), chunk):
        scores = q @ torch.from_numpy(gallery[s:s + chunk]).T  # [Q, chunk]
        cs, ci = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_s, pos = torch.cat([best_s, cs], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, ci + s], 1).gather(1, pos)
        best_s = merged_s
    return best_s.numpy(), best_i.numpy()


def full_matrix_topk(queries: np.ndarray, gallery: np.ndarray, k: int):
    import torch
    scores = torch.from_numpy(queries) @ torch.from_numpy(gallery).T  # [Q, N], as CLIP_benchmark builds it
    s, i = scores.topk(k, dim=1)
    return s.numpy(), i.numpy()


def worker(args: argparse.Namespace) -> dict:
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from clipkit.eval.search import build_index, factory_string, recall_vs_exact, set_search_params, topk_inner_product

    before = peak_rss_gib()  # interpreter + torch + faiss, before any data
    gallery = unit_rows(args.gallery, args.dim, seed=0)
    queries = unit_rows(args.queries, args.dim, seed=1)
    out: dict = {"method": args.worker, "rss_before_data_gib": round(before, 3),
                 "rss_after_data_gib": round(peak_rss_gib(), 3)}
    exact_path = Path(args.tmp) / "exact_ids.npy"
    t0 = time.perf_counter()
    if args.worker == "clipkit_exact":
        _, ids = topk_inner_product(queries, gallery, args.k, use_gpu=False)
        np.save(exact_path, ids)
    elif args.worker == "faiss_flat":
        _, ids = topk_inner_product(queries, gallery, args.k, use_gpu=False, method="faiss")
    elif args.worker == "torch_chunked":
        _, ids = torch_chunked_topk(queries, gallery, args.k)
    elif args.worker == "clipkit_ranks":
        from clipkit.eval.metrics import positive_ranks

        rows = np.arange(args.queries)
        expected = rows % args.k + 1
        owned = np.load(exact_path)[rows, expected - 1] if exact_path.exists() else rows
        t0 = time.perf_counter()
        ranks = positive_ranks(queries, gallery, rows, owned)
        out["search_s"] = round(time.perf_counter() - t0, 3)
        out[f"recall@{args.k}"] = float(np.mean(ranks <= args.k))
        out["mean_rank"], out["median_rank"] = float(np.mean(ranks)), float(np.median(ranks))
        if exact_path.exists():
            # A rank above its top-k position means a wrong item within TIE_ATOL (1e-6) of the
            # correct one: the tie rule counts it ahead. Below would be a miscount.
            out["ranks_equal_exact_topk_positions"] = float(np.mean(ranks == expected))
            out["ranks_above_position"] = int(np.sum(ranks > expected))
            out["ranks_below_position"] = int(np.sum(ranks < expected))
        ids = None
    elif args.worker == "full_matrix":
        _, ids = full_matrix_topk(queries, gallery, args.k)
    else:
        idx = build_index(gallery, args.worker)
        out["factory"] = factory_string(args.worker, args.gallery, args.dim)
        out["build_s"] = round(time.perf_counter() - t0, 3)
        set_search_params(idx, nprobe=args.nprobe, ef_search=args.ef_search)
        out.update(nprobe=args.nprobe, ef_search=args.ef_search)
        t0 = time.perf_counter()
        _, ids = idx.search(queries, args.k)
    out.setdefault("search_s", round(time.perf_counter() - t0, 3))
    out["peak_rss_gib"] = round(peak_rss_gib(), 3)
    out["peak_rss_minus_imports_gib"] = round(out["peak_rss_gib"] - before, 3)
    if ids is not None and args.worker != "clipkit_exact" and exact_path.exists():
        out[f"recall_vs_exact@{args.k}"] = recall_vs_exact(ids, np.load(exact_path), args.k)
    return out


def run_method(method: str, args: argparse.Namespace, tmp: str) -> dict:
    gallery_bytes = args.gallery * args.dim * 4
    if method == "full_matrix":
        need = args.queries * args.gallery * 4 + 2 * gallery_bytes
        if need > 0.8 * mem_available_bytes():
            return {"method": method, "status": "does not fit",
                    "needs_gib": round(need / 2 ** 30, 1), "available_gib": round(mem_available_bytes() / 2 ** 30, 1)}
    cmd = [sys.executable, __file__, "--worker", method, "--tmp", tmp, "--gallery", str(args.gallery),
           "--queries", str(args.queries), "--dim", str(args.dim), "--k", str(args.k), "--threads", str(args.threads),
           "--nprobe", str(args.nprobe), "--ef-search", str(args.ef_search)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "status": f"failed rc={proc.returncode}", "stderr": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 1-minute load averages; > threads means other jobs shared the cores during this method.
    result["loadavg_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["status"] = "ok"
    # The budget (<= 2x the gallery) counts data, not the ~0.5 GiB of imported libraries.
    result["peak_minus_imports_over_gallery"] = round(result["peak_rss_minus_imports_gib"] * 2 ** 30 / gallery_bytes, 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_bench_cpu.json"))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    methods.sort(key=lambda m: m != "clipkit_exact")  # exact first: the others' recall is against it
    gallery_gib = args.gallery * args.dim * 4 / 2 ** 30
    report = {"workload": {"gallery": args.gallery, "queries": args.queries, "dim": args.dim, "k": args.k,
                           "gallery_gib": round(gallery_gib, 3)},
              "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                          "python": platform.python_version()},
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            result = run_method(method, args, tmp)
            report["results"].append(result)
            print(json.dumps(result), flush=True)
    base = next((r["search_s"] for r in report["results"] if r["method"] == "clipkit_exact" and "search_s" in r), None)
    for r in report["results"]:
        if base and "search_s" in r:
            r["seconds_over_clipkit_exact"] = round(r["search_s"] / base, 2)
    for r in report["results"]:
        recall = r.get(f"recall_vs_exact@{args.k}", "-")
        print(f"{r['method']:14s} {r.get('search_s', r['status'])!s:>9} s  x{r.get('seconds_over_clipkit_exact', '-')}"
              f"  peak {r.get('peak_minus_imports_over_gallery', '-')}x gallery  recall {recall}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
