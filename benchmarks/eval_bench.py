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

End to end (`--end-to-end`): what `clipkit-eval` computes for flat retrieval, both directions,
recall@1/5/10, mean and median rank, on planted data: each caption is
normalize(a * its image + sqrt(1 - a^2) * noise) with a ~ U(0.05, 0.3) per caption, so ranks
run from 1 into the thousands. Two cases: `images` (1M images x 10k captions) and `captions`
(the reverse: 10k images x 1M captions, 100 per image). Methods, each in its own process:

    certified   clipkit.eval.metrics.exact_ranks(method="certified"), clipkit-eval's default
    float32     positive_ranks: every score in a float32 GEMM (today's count)
    torch_sort  torch matmul + a full sort of each query's row (the usual recipe); run on
                --sort-queries queries per direction and scaled to all (marked "extrapolated")

    python benchmarks/eval_bench.py --end-to-end --cases images,captions --methods certified,float32,torch_sort \
        --repeats 3 --out benchmarks/results/eval_bench_e2e_cpu.json

Ranks of certified and float32 are compared item for item; where they differ, a float64 check
says which side the exact rule takes. `--zeroshot` measures the zero-shot head (1,000 ImageNet
classes x 80 templates, open_clip's own lists) with the tiny text tower and ViT-B-32's (random
init, offline): the batched, deduplicated build against the per-class loop it replaced.
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


E2E_METHODS = ("certified", "float32", "torch_sort")


def planted_captions(images: np.ndarray, owners: np.ndarray, seed: int, chunk: int = 65536) -> np.ndarray:
    """[M, D] unit captions: normalize(a * images[owner] + sqrt(1 - a^2) * unit noise), a ~ U(0.05, 0.3)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(owners), images.shape[1]), np.float32)
    for s in range(0, len(owners), chunk):
        own = owners[s:s + chunk]
        a = rng.uniform(0.05, 0.3, (len(own), 1)).astype(np.float32)
        noise = rng.standard_normal((len(own), images.shape[1]), dtype=np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        block = a * images[own] + np.sqrt(1 - a * a) * noise
        out[s:s + len(own)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def e2e_data(case: str, big: int, small: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(texts [M, D], images [N, D], owners [M]) of one case, from fixed seeds."""
    if case == "images":     # N = big images, M = small captions of distinct images
        images = unit_rows(big, dim, seed=0)
        owners = np.sort(np.random.default_rng(2).choice(big, small, replace=False))
    else:                    # N = small images, M = big captions, big // small per image
        images = unit_rows(small, dim, seed=0)
        owners = np.repeat(np.arange(small), big // small)
    return planted_captions(images, owners, seed=3), images, owners


def sort_ranks(queries: np.ndarray, gallery: np.ndarray, pair_q: np.ndarray, pair_g: np.ndarray,
               rows: np.ndarray, block: int = 64) -> np.ndarray:
    """torch matmul + full sort: rank of the first correct item in each query's sorted row (index-order ties)."""
    import torch
    g = torch.from_numpy(gallery)
    correct = {}
    for q, i in zip(pair_q.tolist(), pair_g.tolist()):
        correct.setdefault(q, []).append(i)
    out = np.zeros(len(rows), np.int64)
    for s in range(0, len(rows), block):
        ids = rows[s:s + block]
        order = torch.argsort(torch.from_numpy(queries[ids]) @ g.T, dim=1, descending=True, stable=True)  # [b, N]
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        for k, q in enumerate(ids.tolist()):
            out[s + k] = int(position[k, correct[q]].min()) + 1
    return out


def e2e_worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from clipkit.eval.metrics import exact_ranks, rank_metrics

    before = peak_rss_gib()
    texts, images, owners = e2e_data(args.case, args.big, args.small, args.dim)
    out: dict = {"method": args.worker, "case": args.case, "texts": len(texts), "images": len(images),
                 "rss_after_data_gib": round(peak_rss_gib(), 3)}
    captions = np.arange(len(texts))
    has_caption = np.bincount(owners, minlength=len(images)) > 0
    directions = {"image_retrieval": (texts, images, captions, owners),
                  "text_retrieval": (images, texts, owners, captions)}
    total = 0.0
    for name, (queries, gallery, pq, pg) in directions.items():
        t0 = time.perf_counter()
        if args.worker == "torch_sort":
            rows = np.unique(pq)
            rows = np.sort(np.random.default_rng(5).choice(rows, min(args.sort_queries, len(rows)), replace=False))
            ranks = sort_ranks(queries, gallery, pq, pg, rows)
            seconds = time.perf_counter() - t0
            out[f"{name}_measured_s"] = round(seconds, 3)
            out[f"{name}_queries_measured"] = len(rows)
            seconds *= len(np.unique(pq)) / len(rows)
            out[f"{name}_s_extrapolated"] = True
        else:
            ranks = exact_ranks(queries, gallery, pq, pg, method=args.worker)
            seconds = time.perf_counter() - t0
            np.save(Path(args.tmp) / f"{args.case}_{name}_{args.worker}.npy", ranks)
            ranks = ranks[has_caption] if name == "text_retrieval" else ranks
        out[f"{name}_s"] = round(seconds, 3)
        total += seconds
        out.update({k: round(v, 6) for k, v in rank_metrics(ranks, name, (1, 5, 10)).items()})
    out["both_directions_s"] = round(total, 3)
    out["peak_rss_gib"] = round(peak_rss_gib(), 3)
    out["peak_rss_minus_imports_gib"] = round(out["peak_rss_gib"] - before, 3)
    return out


def e2e_verify(args: argparse.Namespace) -> dict:
    """Where certified and float32 ranks differ: the float64 rule's rank for those queries."""
    texts, images, owners = e2e_data(args.case, args.big, args.small, args.dim)
    captions = np.arange(len(texts))
    out = {}
    for name, (queries, gallery, pq, pg) in {"image_retrieval": (texts, images, captions, owners),
                                             "text_retrieval": (images, texts, owners, captions)}.items():
        a = np.load(Path(args.tmp) / f"{args.case}_{name}_certified.npy")
        b = np.load(Path(args.tmp) / f"{args.case}_{name}_float32.npy")
        scored = (a > 0) & (b > 0)   # queries with a correct item (images without captions have rank 0)
        differ = np.nonzero(a != b)[0]
        agree_certified = 0
        g64 = None
        for q in differ[:200].tolist():
            if g64 is None:
                g64 = gallery.astype(np.float64)
            s = g64 @ queries[q].astype(np.float64)
            own = pg[pq == q]
            threshold = np.float32(s[own].max() - 1e-6)
            counted = s.astype(np.float32) >= threshold
            counted[own] = False
            agree_certified += int(counted.sum() + 1 == a[q])
        out[name] = {"queries": int(scored.sum()),
                     "ranks_equal": int(np.sum((a == b) & scored)), "ranks_differ": len(differ),
                     "max_abs_difference": int(np.abs(a - b).max()) if len(differ) else 0,
                     "differing_checked_in_float64": min(len(differ), 200),
                     "float64_agrees_with_certified": agree_certified}
    return out


def zeroshot_bench(args: argparse.Namespace) -> dict:
    """The zero-shot head for 1,000 ImageNet classes x 80 templates: batched + deduplicated vs per class."""
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clipkit.config import CONF_DIR
    from clipkit.eval.suite import ZEROSHOT_TEXT_BATCH
    from clipkit.eval.zeroshot import zeroshot_classifier
    from clipkit.models import build_model
    from clipkit.objective import ContrastiveObjective
    from clipkit.recipe import build_towers

    torch.set_num_threads(args.threads)
    templates = [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]
    results = []
    towers = (("tiny_vit", 1000), ("ViT-B-32", args.zeroshot_classes_vitb32))
    for tower, classes in [t for t in towers if t[0] in args.zeroshot_towers.split(",")]:
        torch.manual_seed(0)
        if tower == "tiny_vit":
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                bundle = build_towers(compose("train", overrides=["model=tiny_vit"]).model)
        else:
            bundle = build_model("ViT-B-32")
        objective = ContrastiveObjective(bundle.model.eval(), loss=None)
        names = list(IMAGENET_CLASSNAMES[:classes])

        def encode(texts: list[str], batch: int = ZEROSHOT_TEXT_BATCH, objective=objective, bundle=bundle) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([objective.encode_text(bundle.tokenizer(texts[i:i + batch]))
                                  for i in range(0, len(texts), batch)])

        stats: dict = {}
        t0 = time.perf_counter()
        new = zeroshot_classifier(encode, names, templates, stats=stats)
        batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = []
        with torch.no_grad():     # the loop it replaced: one encode call per class, its 80 prompts
            for name in names:
                emb = F.normalize(encode([t.replace("{c}", name) for t in templates]).float(), dim=-1)
                old.append(F.normalize(emb.mean(0), dim=-1))
        per_class = time.perf_counter() - t0
        scale = 1000 / classes
        results.append({"tower": tower, "classes_measured": classes, "templates": len(templates), **stats,
                        "batched_s": round(batched, 3), "per_class_loop_s": round(per_class, 3),
                        "batched_s_for_1000_classes": round(batched * scale, 2),
                        "per_class_loop_s_for_1000_classes": round(per_class * scale, 2),
                        "extrapolated": classes != 1000,
                        "max_abs_difference": float((new - torch.stack(old)).abs().max()),
                        "loadavg_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(results[-1]), flush=True)
    return {"zeroshot": results}


def e2e_main(args: argparse.Namespace) -> None:
    cases = [c for c in args.cases.split(",") if c]
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(E2E_METHODS)) + sorted(set(cases) - {"images", "captions"})
    if bad:
        raise SystemExit(f"unknown methods or cases {bad}; methods {list(E2E_METHODS)}, cases images,captions")
    report = {"workload": {"big": args.big, "small": args.small, "dim": args.dim, "cases": cases,
                           "captions": "normalize(a image + sqrt(1 - a^2) noise), a ~ U(0.05, 0.3)"},
              "machine": machine_info(args), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "results": [], "rank_agreement": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for repeat in range(args.repeats):
                for method in methods:   # alternating: certified, float32, ... then again
                    if method != "certified" and repeat > 0 and method in args.once.split(","):
                        continue
                    cmd = [sys.executable, __file__, "--worker", f"e2e_{method}", "--tmp", tmp, "--case", case,
                           "--big", str(args.big), "--small", str(args.small), "--dim", str(args.dim),
                           "--threads", str(args.threads), "--sort-queries", str(args.sort_queries)]
                    load_before = os.getloadavg()
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        result = {"method": method, "case": case, "status": f"failed rc={proc.returncode}",
                                  "stderr": proc.stderr[-2000:]}
                    else:
                        result = json.loads(proc.stdout.strip().splitlines()[-1])
                        result["status"] = "ok"
                    result["repeat"] = repeat + 1
                    result["loadavg_1_5_15_before"] = [round(x, 2) for x in load_before]
                    result["loadavg_1_5_15_after"] = [round(x, 2) for x in os.getloadavg()]
                    report["results"].append(result)
                    print(json.dumps(result), flush=True)
            if {"certified", "float32"} <= set(methods):
                cmd = [sys.executable, __file__, "--worker", "e2e_verify", "--tmp", tmp, "--case", case,
                       "--big", str(args.big), "--small", str(args.small), "--dim", str(args.dim)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                report["rank_agreement"][case] = (json.loads(proc.stdout.strip().splitlines()[-1])
                                                  if proc.returncode == 0 else proc.stderr[-2000:])
                print(json.dumps({case: report["rank_agreement"][case]}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def machine_info(args: argparse.Namespace) -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


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
    p.add_argument("--end-to-end", action="store_true", help="clipkit-eval's retrieval metrics, both directions")
    p.add_argument("--cases", default="images,captions")
    p.add_argument("--big", type=int, default=1_000_000, help="end to end: the large side (images or captions)")
    p.add_argument("--small", type=int, default=10_000, help="end to end: the small side")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--once", default="torch_sort", help="end to end: methods run in the first repeat only")
    p.add_argument("--sort-queries", type=int, default=500, help="torch_sort: queries measured per direction")
    p.add_argument("--zeroshot", action="store_true", help="the zero-shot head's cost, 1,000 classes x 80 templates")
    p.add_argument("--zeroshot-classes-vitb32", type=int, default=1000)
    p.add_argument("--zeroshot-towers", default="tiny_vit,ViT-B-32")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=[*METHODS, *(f"e2e_{m}" for m in E2E_METHODS), "e2e_verify"],
                   help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "e2e_verify":
        print(json.dumps(e2e_verify(args)))
        return
    if args.worker and args.worker.startswith("e2e_"):
        args.worker = args.worker[4:]
        print(json.dumps(e2e_worker(args)))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.zeroshot:
        report = {"machine": machine_info(args), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  **zeroshot_bench(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    if args.end_to_end:
        e2e_main(args)
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
