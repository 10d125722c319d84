"""Reproduce the committed CPU memory benchmark: benchmarks/results/memory_cpu.json and memory_cpu.png.

    python benchmarks/memory.py            # the committed settings
    python benchmarks/memory.py --threads 1   # extra options are passed on (replacing the same ones of SETTINGS)

It is `mrml bench memory` (see `mrml.bench`) with these settings: Conv-4-64 on synthetic 3x32x32 images,
5-way 5-shot, 5 query images per class, meta-batch 4, K in 1,5,10,20,50,100 for mrml, MAML, ANIL,
ITD-BiO and iMAML with every applicable variant (except MAML at K=100: see SETTINGS), 3 timed repeats
after a warm-up, 20 CG steps, on the CPU with torch's default number of threads (all cores; on a busy
machine `--threads 1` gives far steadier times). Every configuration runs in a fresh process.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mrml.cli import main, replace_options

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = [
    "--device", "cpu", "--dataset", "synthetic", "--image-size", "32", "--channels", "3",
    "--backbone", "conv4", "--width", "64", "--ways", "5", "--shots", "5", "--query", "5", "--meta-batch", "4",
    "--algos", "mrml,maml,anil,itd-bio,imaml", "--steps", "1,5,10,20,50,100", "--repeats", "3", "--cg-steps", "20",
    "--seed", "0", "--timeout", "1800",
    # MAML at K=100 is by far the slowest configuration (each meta-step unrolls 100 second-order
    # steps through the whole network: minutes per meta-step on a 2-core CPU, 5 meta-steps); K <= 50
    # already shows its linear growth. Delete this line to measure it too.
    "--skip", "maml:100",
]


def run(extra: list[str]) -> int:
    return main(["bench", "memory", *replace_options([*SETTINGS, "--json", str(RESULTS / "memory_cpu.json"),
                                                      "--plot", str(RESULTS / "memory_cpu.png")], extra)])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
