"""Many `bench/vq_quality.py` runs at once (configurations × seeds) in worker processes, and the
mean ± std table over seeds that decides presets: one seed's PSNR varies by about ±0.15 dB here, more
than most differences between variants, so single runs cannot choose between them.

Each job file line is `["ours/default", {"replace_every": 10}]` (a configuration and option overrides).
On a GPU, one small autoencoder leaves the card mostly idle, so a dozen workers share it.

    python bench/vq_quality_sweep.py --jobs bench/sweeps/around_default.jsonl --seeds 4,5,6,7 \\
        --device cuda --workers 15 --out bench/results/vq_quality_h200.jsonl
    python bench/vq_quality_sweep.py --summary bench/results/vq_quality_h200.jsonl
    python bench/vq_quality_sweep.py --jobs bench/sweeps/large_vocab.jsonl --bits 16 --device cuda --workers 8 \\
        --out bench/results/vq_quality_16bit_gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_PSNR, TARGET_PERPLEXITY = 24.1, 960.0  # issue 2's targets for the default preset


def _work(job: tuple[str, dict, int, int, str, int]) -> dict:
    name, overrides, seed, steps, device, bits = job
    import torch

    torch.set_num_threads(1)  # many workers: one thread each
    import bench.vq_quality as vq
    from bench.vq_quality import run

    vq.CODES = 2**bits  # what `vq_quality.py --bits` sets

    try:
        result = run(name, steps, 128, seed, overrides or None, device)
    except Exception as e:  # one failing configuration must not lose the others' results
        return {"config": name, "overrides": overrides, "seed": seed, "error": repr(e)[:500]}
    return {**result, "overrides": overrides}


def read_jobs(path: Path) -> list[tuple[str, dict]]:
    """The job file's `[configuration, overrides]` lines, checked before any run starts (errors name the line)."""
    from bench.vq_quality import CONFIGS, OURS

    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            name, overrides = json.loads(line)
        except (json.JSONDecodeError, ValueError, TypeError):
            raise SystemExit(f"{path}:{number}: expected [configuration, {{overrides}}], got {line!r}") from None
        if name not in CONFIGS or not isinstance(overrides, dict) or (overrides and name not in OURS):
            raise SystemExit(f"{path}:{number}: unknown configuration {name!r} or overrides on a non-ours/ one")
        jobs.append((name, overrides))
    return jobs


def sweep(jobs_file: Path, seeds: list[int], steps: int, device: str, workers: int, out: Path | None,
          bits: int = 10) -> None:
    lines = read_jobs(jobs_file)
    # seed-major order: an interrupted sweep still has every configuration at the first seeds
    jobs = [(name, overrides, seed, steps, device, bits) for seed in seeds for name, overrides in lines]
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, result in enumerate(pool.imap_unordered(_work, jobs), 1):
            print(f"[{time.time() - t0:.0f}s {i}/{len(jobs)}] {json.dumps(result)}", flush=True)
            if out:
                with out.open("a") as f:
                    f.write(json.dumps(result) + "\n")


def summary(files: list[Path], baseline: str = "ours/default") -> str:
    """Markdown table: per configuration, mean ± population std over its seeds, best PSNR first, and the
    mean PSNR difference to `baseline` at the same seeds (each seed's baseline runs averaged). The seed
    (initialisation and data order) moves PSNR more than most options do, so unpaired means of different
    seed sets mislead; the paired difference removes that shared part."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in files:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "error" not in row:
                groups[row["config"]].append(row)
    by_seed: dict[int, list[float]] = defaultdict(list)
    for r in groups.get(baseline, []):
        by_seed[r["seed"]].append(r["psnr_db"])
    rows = []
    for name, runs in groups.items():
        psnr = [r["psnr_db"] for r in runs]
        ppl = [r["perplexity"] for r in runs]
        ret = [r["class_retention"] for r in runs]
        diffs = [r["psnr_db"] - statistics.mean(by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
        paired = "" if name == baseline or not diffs else f"{statistics.mean(diffs):+.2f} ({len(diffs)})"
        rows.append((statistics.mean(psnr), name, runs, psnr, ppl, ret, paired))
    out = [
        f"| configuration | seeds | PSNR dB (mean ± std) | Δ vs `{baseline}`, same seeds (n) "
        "| perplexity (mean, min) | codes used (min) | class retention |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _, name, runs, psnr, ppl, ret, paired in sorted(rows, key=lambda r: -r[0]):
        out.append(
            f"| `{name}` | {len(runs)} | {statistics.mean(psnr):.2f} ± {statistics.pstdev(psnr):.2f} | {paired} "
            f"| {statistics.mean(ppl):.0f}, {min(ppl):.0f} | {min(r['codes_used'] for r in runs)} "
            f"| {statistics.mean(ret):.3f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=Path, help="JSON lines: [configuration, overrides]")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bits", type=int, default=10, help="codebook of 2^bits codes, as in vq_quality.py")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--summary", type=Path, nargs="+", help="print the table of these result files and exit")
    args = ap.parse_args()
    if args.summary:
        print(summary(args.summary))
        return
    if not args.jobs:
        raise SystemExit("--jobs: a job file is needed (or --summary FILES)")
    seeds = [int(s) for s in args.seeds.split(",")]
    sweep(args.jobs, seeds, args.steps, args.device, args.workers, args.out, args.bits)


if __name__ == "__main__":
    main()
