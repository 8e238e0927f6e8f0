"""One screen from the GPU checks' JSON files (benchmarks/gpu_checks.sh calls it last).

    python benchmarks/gpu_summary.py OUT_DIR ["part: status" ...]

Reads OUT_DIR/{triton_parity_gpu,loss_bench_gpu,train_bench_gpu}.json where present (a part that
timed out or failed may have left a partial file or none) and prints the parts' statuses, the
parity verdict, the loss table and the training comparison.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def parity_lines(data: dict | None) -> list[str]:
    if not data:
        return ["parity: no result"]
    rows = data["rows"]
    failed = [r for r in rows if not r["pass"]]
    lines = [f"parity (Triton vs float64 truth; chunked in brackets): {len(rows) - len(failed)}/{len(rows)} rows pass"]
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        of = [r for r in rows if r["dtype"] == dtype]
        worst = max(of, key=lambda r: r["triton_err"])
        lines.append(f"  {dtype:9} worst {worst['triton_err']:.1e} [{max(r['chunked_err'] for r in of):.1e}] "
                     f"at {worst['batch']}x{worst['dim']} {worst['case']} ({worst['worst']}); tolerance "
                     f"{data['tolerance'][dtype]:.0e}")
    lines += [f"  FAIL {r['dtype']} {r['batch']}x{r['dim']} {r['case']} chunk {r['chunk']}: {r['worst']} "
              f"{r['triton_err']:.1e}" for r in failed[:5]]
    return lines


def loss_lines(data: dict | None) -> list[str]:
    if not data:
        return ["loss bench: no result"]
    rates = ", ".join(f"{dt} {v / 1e12:.0f} TFLOP/s" for dt, v in data.get("measured_gemm_flops", {}).items())
    lines = [f"loss fwd+bwd, D {data['rows'][0]['dim'] if data['rows'] else '?'} (ms / peak MiB; x4U at the measured "
             f"GEMM rate: {rates})",
             f"  {'loss':6} {'dtype':5} {'B':>7}  {'triton':>22}  {'chunked':>16}  {'open_clip':>16}  "
             f"{'triton/open_clip':>16}"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in data["rows"]:
        groups.setdefault((r["kind"], r["dtype"], r["batch"]), {})[r["impl"]] = r

    def cell(r: dict | None, floor: bool = False) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return "OOM" if r["status"] == "OOM" else r["status"].split(" (")[0][:16]
        text = f"{r['median_s'] * 1e3:.1f} / {r['peak_mb']:.0f}" if r.get("peak_mb") is not None \
            else f"{r['median_s'] * 1e3:.1f}"
        xm = r.get("x_floor_4u_measured", math.nan)
        return text + (f" ({xm:.2f}x)" if floor and not math.isnan(xm) else "")

    for (kind, dtype, batch), impls in groups.items():
        tri, oc = impls.get("triton"), impls.get("open_clip")
        ratio = "-"
        if tri and oc and tri["status"] == oc["status"] == "ok":
            mem = (f", 1/{oc['peak_mb'] / tri['peak_mb']:.0f} mem" if tri.get("peak_mb") and oc.get("peak_mb")
                   else "")
            ratio = f"{tri['median_s'] / oc['median_s']:.2f}x{mem}"
        lines.append(f"  {kind:6} {dtype:5} {batch:>7}  {cell(tri, True):>22}  {cell(impls.get('chunked')):>16}  "
                     f"{cell(oc):>16}  {ratio:>16}")
    return lines


def train_lines(data: dict | None) -> list[str]:
    if not data or not data.get("points"):
        return ["train bench: no result"]
    lines = []
    for key, point in data["points"].items():
        med, rat = point["medians"], point.get("ratios_over_open_clip", {})
        lines.append(f"train {key}, batch {point['case']['batch']}, {point['case']['steps']} steps, "
                     f"{point['case']['repeats']} alternation(s):")
        for trainer, m in med.items():
            gpu = f", GPU peak {m['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in m else ""
            raw = ", ".join(f"{r['samples_per_s']:.0f}" for r in point["runs"][trainer])
            lines.append(f"  {trainer:>10}: {m['samples_per_s']:.0f} samples/s ({raw}){gpu}, data wait "
                         f"{m['data_wait_frac']:.0%}, loss last10 {m['last10_loss_mean']:.4f}")
        for trainer, err in point.get("failed", {}).items():
            lines.append(f"  {trainer:>10}: FAILED: {err.strip().splitlines()[-1][:100]}")
        for label, q in rat.items():
            gpu = f", GPU memory {q['peak_gpu_mib']:.2f}x" if "peak_gpu_mib" in q else ""
            lines.append(f"  {label} / open_clip_train: samples/s {q['samples_per_s']:.2f}x{gpu}")
    return lines


def main(argv: list[str]) -> None:
    out = Path(argv[0])
    parity, loss, train = (load(out / f"{n}.json") for n in ("triton_parity_gpu", "loss_bench_gpu", "train_bench_gpu"))
    device = next((d["device"] for d in (loss, parity) if d and "device" in d), "?")
    torch_version = next((d["torch"] for d in (loss, parity) if d and "torch" in d), "?")
    print(f"== GPU checks, {device}, torch {torch_version}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if argv[1:]:
        print("parts: " + " | ".join(argv[1:]))
    for lines in (parity_lines(parity), loss_lines(loss), train_lines(train)):
        print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
