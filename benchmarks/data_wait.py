"""How long the training loop waits for its episodes, per data format, with and without --augment, --prefetch 0 vs N.

Each case is one short `mrml train` in a fresh process; its final.json gives `data_wait_s` (mean seconds
per meta-iteration the loop spent getting its episodes: building them with --prefetch 0, waiting for
the background thread otherwise) and `seconds_per_iteration`. The formats are the synthetic files the
tests build (tests/fixtures_formats.py), made larger: glyphs (embedded, in-memory arrays), cifar-fs
(PNG folders decoded at load, 32 x 32), mini-imagenet (a pickled uint8 array, 84 x 84) and
tiered-imagenet (pickled PNG bytes, decoded per episode, 84 x 84). Glyphs has no augmentation.

    OMP_NUM_THREADS=1 python benchmarks/data_wait.py            # writes benchmarks/results/data_wait/
    python benchmarks/data_wait.py --iterations 20 --prefetch 2 --rounds 3

Writes OUT/data_wait.json (settings, machine, every run, the start-up a worker process would cost) and OUT/data_wait.csv (one row per case).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fixtures_formats as fx  # noqa: E402

FORMATS = ("glyphs", "cifar-fs", "mini-imagenet", "tiered-imagenet")
STORAGE = {"glyphs": "in-memory arrays, 28 px", "cifar-fs": "PNG folders decoded at load, 32 px",
           "mini-imagenet": "pickled uint8 array, 84 px", "tiered-imagenet": "PNG bytes decoded per episode, 84 px"}


def make_data(fmt: str, tmp: Path, classes: int, per_class: int) -> list[str]:
    """`mrml train` options reading the synthetic files of `fmt` (classes per split, images per class)."""
    if fmt == "glyphs":
        return ["--dataset", "glyphs"]
    split = {s: [f"n{i:08d}" for i in range(k * classes, (k + 1) * classes)]
             for k, s in enumerate(("train", "validation", "test"))}
    if fmt == "cifar-fs":
        root = fx.r2d2_pngs(tmp / fmt, split, per_class)
    elif fmt == "mini-imagenet":
        root = fx.mini_cache(tmp / fmt, split, per_class)
    else:
        root = fx.tiered_png(tmp / fmt, split, per_class)
    split_file = fx.write_split(tmp / f"{fmt}-split.json", split, images_per_class=per_class)
    return ["--dataset", fmt, "--data-root", str(root), "--split-file", str(split_file)]


def run_case(data: list[str], augment: bool, prefetch: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "mrml.cli", "train", *data, "--ways", str(args.ways), "--shots", str(args.shots),
           "--query", str(args.query), "--meta-batch", str(args.meta_batch), "--width", str(args.width),
           "--iterations", str(args.iterations), "--val-every", str(10**6), "--val-episodes", "1",
           "--test-episodes", "1", "--log-every", str(10**6), "--checkpoint-every", str(10**6), "--threads", "1",
           "--device", args.device, "--prefetch", str(prefetch), "--no-progress", "--out", str(out)]
    if augment:
        cmd.append("--augment")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    final = json.loads((out / "final.json").read_text())
    return {"data_wait_s": final["data_wait_s"], "seconds_per_iteration": final["seconds_per_iteration"],
            "wall_s": round(time.perf_counter() - t0, 2)}


def process_start_s(repeats: int = 3) -> float:
    """Seconds a fresh Python process takes to import mrml's training code: what each worker process
    would pay at start (before reading its dataset), against nothing for a thread."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mrml.train"], check=True)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--query", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--prefetch", type=int, default=2, help="the setting compared against 0")
    p.add_argument("--rounds", type=int, default=1, help="runs of each case (medians reported), interleaved")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "data_wait"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = max(20, args.shots + args.query)
    runs, rows = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt in args.formats:
            data = make_data(fmt, tmp, args.ways, per_class)
            for augment in ((False,) if fmt == "glyphs" else (False, True)):
                by: dict[int, list[dict]] = {0: [], args.prefetch: []}
                for r in range(args.rounds):
                    for prefetch in by:
                        res = run_case(data, augment, prefetch, args, tmp / f"{fmt}-{augment}-{prefetch}-{r}")
                        by[prefetch].append(res)
                        runs.append({"format": fmt, "augment": augment, "prefetch": prefetch, "round": r, **res})
                row = {"format": fmt, "storage": STORAGE[fmt], "augment": augment}
                for prefetch, label in ((0, "off"), (args.prefetch, "on")):
                    row[f"wait_ms_{label}"] = round(1e3 * statistics.median(x["data_wait_s"] for x in by[prefetch]), 3)
                    row[f"s_per_it_{label}"] = round(statistics.median(x["seconds_per_iteration"] for x in by[prefetch]), 4)
                rows.append(row)
                print(f"{fmt:16} augment={str(augment):5}  wait {row['wait_ms_off']:8.2f} ms -> {row['wait_ms_on']:8.2f} ms"
                      f"   s/iter {row['s_per_it_off']:.3f} -> {row['s_per_it_on']:.3f}", flush=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "images_per_class": per_class,
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "process_start_s": process_start_s(), "rows": rows, "runs": runs}
    (out / "data_wait.json").write_text(json.dumps(result, indent=1))
    with open(out / "data_wait.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{'format':16} {'augment':8} {'wait off ms':>12} {'wait on ms':>11} {'s/iter off':>11} {'s/iter on':>10}")
    for r in rows:
        print(f"{r['format']:16} {str(r['augment']):8} {r['wait_ms_off']:12.2f} {r['wait_ms_on']:11.2f} "
              f"{r['s_per_it_off']:11.3f} {r['s_per_it_on']:10.3f}")
    print(f"a worker process would start in {result['process_start_s']:.2f} s (import mrml.train); a thread: none")
    print(f"results in {out}")
    return result


if __name__ == "__main__":
    main()
