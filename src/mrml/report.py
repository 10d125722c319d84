"""Figures and tables from run folders: `mrml plot` and `mrml compare`.

A run folder (written by `mrml train`) holds config.json, metrics.jsonl (one record per line:
{"split": "train" | "validation", "iteration", "loss", "accuracy", "seconds", "peak_mb" (train), "ci95"
(validation), ...}) and, once the run has finished, final.json (meta-test accuracy, ci95,
seconds_per_iteration, peak_mb, ...).

- `mrml plot RUN_DIR ... --x iteration|seconds --y accuracy|loss|peak_mb --out FIG.png [--split ...]`
  overlays the runs, one line per run labelled by algorithm and settings ("mrml K=20 5w1s");
- `mrml compare RUN_DIR ... [--json | --markdown]` tabulates meta-test accuracy +/- CI, seconds per
  iteration and peak memory per run.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UsageError

X_AXES = {"iteration": "outer iteration", "seconds": "training time (s)"}
Y_AXES = {"accuracy": "accuracy (%)", "loss": "loss", "peak_mb": "peak memory (MB)"}
Y_NAMES = {"accuracy": "accuracy", "loss": "loss", "peak_mb": "peak memory"}
LINE_STYLES = ["-", "--", "-.", ":"]  # overlapping runs (e.g. equal memory) stay visible
DEFAULT_SPLIT = {"accuracy": "validation", "loss": "validation", "peak_mb": "train"}
# algorithms with no inner gradient steps (K means nothing for them)
NO_INNER_STEPS = {"protonet"}
# settings that tell runs apart when algorithm, K and N-way K-shot do not: (config key, short label)
DISTINGUISHING = [
    ("dataset", ""), ("cg_steps", "N"), ("inner_lr", "alpha"), ("outer_lr", "lr"), ("meta_batch", "B"),
    ("l2", "lam"), ("inner", "inner"), ("backbone", ""), ("width", "width"), ("warm_start", "warm"),
    ("first_order", "first-order"), ("plain_inner", "plain"), ("recompute_features", "recompute"), ("optimizer", ""), ("dtype", ""),
    ("query", "q"), ("iterations", "T"), ("seed", "seed"),
]


@dataclass
class RunRecords:
    """What a run folder holds: its config, its metric records and (if finished) final.json."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.final is not None

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("split") == name]

    @property
    def last_iteration(self) -> int:
        its = [r["iteration"] for r in self.records if isinstance(r.get("iteration"), int)]
        return max(its) if its else 0


# final.json fields that must be numbers (or null) for a table or plot
FINAL_NUMBERS = ("iterations", "seconds", "seconds_per_iteration", "peak_mb", "accuracy", "ci95", "loss", "loss_ci95",
                 "episodes")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}): is it a run folder written by `mrml train`?") from None


def load_run(path: str | Path) -> RunRecords:
    """Read a run folder; a missing folder or a folder that is no run is a one-line UsageError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"{path} is not a folder: expected a run folder written by `mrml train --out DIR`")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{path} is not a run folder: no config.json (written by `mrml train --out DIR`)")
    config = _read_json(cfg_path)
    if not isinstance(config, dict) or "algo" not in config:
        raise UsageError(f"{cfg_path} is not an mrml run config (no 'algo')")
    records: list[dict[str, Any]] = []
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        try:
            lines = metrics.read_bytes().splitlines()
        except OSError as e:
            raise UsageError(f"cannot read {metrics}: {e.strerror or e}") from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i == len(lines):  # a line being written by a running `mrml train`, or cut off by a full disk
                    break
                raise UsageError(f"{metrics}, line {i}: not a JSON record") from None
            if not isinstance(rec, dict):
                raise UsageError(f"{metrics}, line {i}: not a JSON object")
            records.append(rec)
    final = None
    if (path / "final.json").is_file():
        final = _read_json(path / "final.json")
        if not isinstance(final, dict):
            raise UsageError(f"{path / 'final.json'} is not a JSON object")
        for key in FINAL_NUMBERS:
            value = final.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise UsageError(f"{path / 'final.json'}: {key!r} is {value!r}, expected a number or null "
                                 "(was the file edited by hand?)")
            if value is not None and (value < 0 or (key == "accuracy" and value > 1)):
                bound = "in [0, 1]" if key == "accuracy" else ">= 0"
                raise UsageError(f"{path / 'final.json'}: {key!r} is {value!r}, expected a number {bound} "
                                 "(was the file edited by hand?)")
    return RunRecords(path, config, records, final)


def load_runs(paths: Sequence[str | Path]) -> list[RunRecords]:
    if not paths:
        raise UsageError("give at least one run folder")
    return [load_run(p) for p in paths]


# -- labels -----------------------------------------------------------------------------------------
def base_label(cfg: dict[str, Any]) -> str:
    """`mrml K=20 5w1s`: algorithm, inner steps (where the algorithm has them), ways and shots."""
    parts = [str(cfg.get("algo", "?"))]
    if cfg.get("algo") not in NO_INNER_STEPS and cfg.get("inner_steps") is not None:
        parts.append(f"K={cfg['inner_steps']}")
    if cfg.get("ways") is not None and cfg.get("shots") is not None:
        parts.append(f"{cfg['ways']}w{cfg['shots']}s")
    return " ".join(parts)


def _fmt_setting(key: str, short: str, value: Any) -> str:
    if isinstance(value, bool):
        return short if value else f"no-{short}"
    if value is None:
        return f"{short or key}=default"
    return f"{short}={value}" if short else str(value)


def run_labels(runs: Sequence[RunRecords]) -> list[str]:
    """One label per run: the base label, plus the settings that tell apart runs sharing it, plus the
    folder name where nothing else does."""
    labels = [base_label(r.config) for r in runs]
    for _ in range(2):
        groups: dict[str, list[int]] = {}
        for i, lab in enumerate(labels):
            groups.setdefault(lab, []).append(i)
        for lab, idx in groups.items():
            if len(idx) < 2:
                continue
            extra: dict[int, list[str]] = {i: [] for i in idx}
            for key, short in DISTINGUISHING:
                values = [runs[i].config.get(key) for i in idx]
                if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
                    for i, v in zip(idx, values):
                        extra[i].append(_fmt_setting(key, short, v))
            for i in idx:
                if extra[i]:
                    labels[i] = f"{lab} {' '.join(extra[i])}"
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return [f"{lab} ({r.path.name})" if counts[lab] > 1 else lab for lab, r in zip(labels, runs)]


# -- plot -----------------------------------------------------------------------------------------
def series(run: RunRecords, x: str, y: str, split: str) -> tuple[list[float], list[float], list[float] | None]:
    """(x values, y values, half-width of the 95% CI or None) of one run; accuracy in percent."""
    recs = run.split(split)
    if not recs:
        raise UsageError(f"{run.path}: no {split} records in metrics.jsonl"
                         + (" (validation runs every --val-every iterations; try --split train)" if split == "validation" else
                            " (the run has not logged an iteration yet)"))
    pts = [r for r in recs if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
           and math.isfinite(r[y])]
    if not pts:
        hint = ""
        if y == "accuracy":
            hint = " (a regression run has no accuracy: use --y loss)"
        elif y == "peak_mb" and split != "train":
            hint = " (peak memory is logged with the train records: use --split train)"
        raise UsageError(f"{run.path}: its {split} records have no {y}{hint}")
    pts.sort(key=lambda r: r[x])
    scale = 100.0 if y == "accuracy" else 1.0
    xs = [float(r[x]) for r in pts]
    ys = [scale * float(r[y]) for r in pts]
    ci = None
    if y == "accuracy" and all(isinstance(r.get("ci95"), (int, float)) for r in pts):
        ci = [scale * float(r["ci95"]) for r in pts]
    return xs, ys, ci


def plot_runs(paths: Sequence[str | Path], x: str = "seconds", y: str = "accuracy", out: str | Path = "plot.png",
              split: str | None = None, title: str | None = None) -> Path:
    """Overlay the runs' `y` against `x` and save the figure to `out` (format from its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise UsageError(f"unknown --x {x!r}: expected one of {', '.join(X_AXES)}")
    if y not in Y_AXES:
        raise UsageError(f"unknown --y {y!r}: expected one of {', '.join(Y_AXES)}")
    split = split or DEFAULT_SPLIT[y]
    out = Path(out)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FigureCanvasAgg.get_supported_filetypes():
        raise UsageError(f"cannot tell the image format of --out {out}: end it with one of "
                         f"{', '.join('.' + f for f in ('png', 'pdf', 'svg'))}")
    runs = load_runs(paths)
    data = [series(r, x, y, split) for r in runs]
    labels = run_labels(runs)

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, ((xs, ys, ci), label) in enumerate(zip(data, labels)):
        line, = ax.plot(xs, ys, LINE_STYLES[i // 10 % len(LINE_STYLES)] if len(runs) <= 10 else "-",
                        marker="o" if len(xs) <= 30 else None, ms=3, label=label)
        if ci is not None and len(xs) > 1:
            ax.fill_between(xs, [a - c for a, c in zip(ys, ci)], [a + c for a, c in zip(ys, ci)],
                            color=line.get_color(), alpha=0.15, lw=0)
    datasets = sorted({str(r.config.get("dataset")) for r in runs})
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(f"{split} {Y_AXES[y]}")
    ax.set_title(title or f"{split} {Y_NAMES[y]} against {X_AXES[x].split(' (')[0]} ({', '.join(datasets)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise UsageError(f"cannot write --out {out}: {e.strerror or e}") from None
    return out


# -- compare ---------------------------------------------------------------------------------------
def summary(run: RunRecords, label: str) -> dict[str, Any]:
    """One row of the comparison; values a run does not have (yet) are None."""
    cfg, fin = run.config, run.final or {}
    train = run.split("train")
    sec_per_it = fin.get("seconds_per_iteration")
    if sec_per_it is None and train:
        last = max(train, key=lambda r: r.get("iteration", 0))
        if isinstance(last.get("seconds"), (int, float)) and last.get("iteration"):
            sec_per_it = last["seconds"] / last["iteration"]
    peak = fin.get("peak_mb")
    if peak is None:
        peaks = [r["peak_mb"] for r in train if isinstance(r.get("peak_mb"), (int, float))]
        peak = max(peaks) if peaks else None
    return {
        "run": str(run.path), "label": label, "algo": cfg.get("algo"), "dataset": cfg.get("dataset"),
        "ways": cfg.get("ways"), "shots": cfg.get("shots"), "inner_steps": cfg.get("inner_steps"),
        "finished": run.finished, "iteration": fin.get("iterations", run.last_iteration), "iterations": cfg.get("iterations"),
        "accuracy": fin.get("accuracy"), "ci95": fin.get("ci95"), "loss": fin.get("loss"), "loss_ci95": fin.get("loss_ci95"),
        "episodes": fin.get("episodes"), "seconds_per_iteration": sec_per_it, "peak_mb": peak,
    }


def compare_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    runs = load_runs(paths)
    return [summary(r, lab) for r, lab in zip(runs, run_labels(runs))]


def _metric_cell(row: dict[str, Any]) -> str:
    if row["accuracy"] is not None:
        ci = f" ± {100 * row['ci95']:.2f}" if row.get("ci95") is not None else ""
        return f"{100 * row['accuracy']:.2f}{ci}%"
    if row["loss"] is not None:
        ci = f" ± {row['loss_ci95']:.4f}" if row.get("loss_ci95") is not None else ""
        return f"loss {row['loss']:.4f}{ci}"
    return "-"


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    head = ["run", "label", "iterations", "meta-test accuracy", "s/iteration", "peak MB"]
    body = []
    for r in rows:
        its = f"{r['iteration']}" if r["finished"] else f"{r['iteration']}/{r['iterations']} (unfinished)"
        body.append([
            Path(r["run"]).name or r["run"], r["label"], its, _metric_cell(r),
            f"{r['seconds_per_iteration']:.4g}" if r["seconds_per_iteration"] is not None else "-",
            f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "-",
        ])
    return head, body


def format_table(rows: list[dict[str, Any]]) -> str:
    head, body = table_cells(rows)
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    right = {2, 3, 4, 5}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body]
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    head, body = table_cells(rows)
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---", "---:", "---:", "---:", "---:"]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in b) + " |" for b in body]
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------------
def cmd_plot(ns: argparse.Namespace) -> int:
    out = plot_runs(ns.run_dirs, ns.x, ns.y, ns.out, ns.split, ns.title)
    print(f"wrote {out}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    if ns.json and ns.markdown:
        raise UsageError("choose one of --json and --markdown")
    rows = compare_runs(ns.run_dirs)
    if ns.json:
        print(json.dumps(rows, indent=1))
    elif ns.markdown:
        print(format_markdown(rows))
    else:
        print(format_table(rows))
    return 0


def add_commands(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    p = subparsers.add_parser("plot", help="overlay runs: accuracy, loss or peak memory against iterations or time")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `mrml train`")
    p.add_argument("--x", choices=list(X_AXES), default="seconds", help="horizontal axis (default: seconds, training time)")
    p.add_argument("--y", choices=list(Y_AXES), default="accuracy", help="vertical axis (default: accuracy)")
    p.add_argument("--split", choices=["train", "validation"], default=None,
                   help="records to plot (default: validation for accuracy and loss, train for peak_mb)")
    p.add_argument("--out", required=True, metavar="FIG.png", help="image file to write (.png, .pdf, .svg)")
    p.add_argument("--title", default=None)
    commands["plot"] = cmd_plot

    p = subparsers.add_parser("compare", help="table of meta-test accuracy, seconds per iteration and peak memory per run")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by `mrml train`")
    p.add_argument("--json", action="store_true", help="print the table as a JSON list")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    commands["compare"] = cmd_compare
