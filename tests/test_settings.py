"""Each setting declared once (mrml.settings): AlgoConfig checked when made, RunConfig holding an AlgoConfig with
config.json kept flat, `mrml train` options and `--config FILE` made from the declarations."""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from mrml import bench, cli
from mrml.algorithms import AlgoConfig
from mrml.config import RunConfig, read_config_file
from mrml.errors import UsageError
from mrml.presets import PRESETS
from mrml.settings import check_settings, cli_settings, flag, help_of, kind

ROOT = Path(__file__).resolve().parents[1]

# the keys config.json was written with before RunConfig held an AlgoConfig (mrml 0.x): they must all still load
OLD_CONFIG = {
    "dataset": "tiny", "data_root": None, "split_file": None, "augment": False, "rotations": False, "image_size": None,
    "ways": 3, "shots": 1, "query": 2, "algo": "mrml", "inner": None, "inner_steps": 3, "inner_solver": None,
    "inner_tol": 1e-06, "implicit": None, "learn_l2": None, "inner_lr": 0.1, "l2": None, "prox": None, "cg_steps": 3,
    "cg_tol": 1e-10, "warm_start": False, "plain_inner": False, "recompute_features": False, "first_order": False,
    "test_steps": 7, "test_lr": 0.05, "task_chunk": 1, "amp": None, "compile": False, "backbone": "conv4", "width": 4,
    "meta_batch": 2, "iterations": 2, "outer_lr": 0.001, "optimizer": "adam", "seed": 5, "eval_seed": 0,
    "device": "auto", "dtype": "float32", "threads": None, "out": "runs/old", "preset": None, "log_every": 10,
    "val_every": 100, "val_episodes": 100, "test_episodes": 600, "checkpoint_every": 100, "tensorboard": False,
    "dist_timeout": 600.0,
}
# `mrml train`'s options before they were made from the declarations: none may disappear
OLD_TRAIN_OPTIONS = [
    "--dataset", "--data-root", "--split-file", "--image-size", "--algo", "--ways", "--shots", "--query", "--meta-batch",
    "--iterations", "--inner-steps", "--inner-lr", "--outer-lr", "--cg-steps", "--cg-tol", "--l2", "--inner",
    "--backbone", "--width", "--seed", "--eval-seed", "--out", "--device", "--dtype", "--task-chunk", "--amp",
    "--threads", "--preset", "--optimizer", "--test-steps", "--test-lr", "--log-every", "--val-every", "--val-episodes",
    "--test-episodes", "--checkpoint-every", "--dist-timeout", "--inner-solver", "--inner-tol", "--implicit",
    "--warm-start", "--recompute-features", "--first-order", "--plain-inner", "--augment", "--compile", "--tensorboard",
    "--rotations", "--learn-l2", "--no-learn-l2", "--prox", "--no-prox", "--resume", "--no-progress",
]
TINY = ["--dataset", "tiny", "--ways", "3", "--shots", "1", "--query", "2", "--meta-batch", "2", "--width", "4",
        "--inner-steps", "3", "--cg-steps", "3", "--val-every", "2", "--val-episodes", "2", "--test-episodes", "3",
        "--log-every", "1", "--seed", "7", "--no-progress"]


def one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# -- AlgoConfig: checked when made -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needles", [
    ({"inner_steps": -1}, ["--inner-steps must be >= 0", "got -1"]),
    ({"amp": "fp8"}, ["--amp must be bf16 or fp16", "'fp8'"]),
    ({"inner_solver": "newtn"}, ["--inner-solver must be gd or newton", "'newtn'"]),
    ({"implicit": "cgg"}, ["--implicit must be one of cg, direct, damped, neumann", "'cgg'"]),
    ({"inner_lr": 0.0}, ["--inner-lr must be > 0"]),
    ({"inner_tol": float("nan")}, ["--inner-tol must be > 0", "finite"]),
    ({"l2": -0.5}, ["--l2 must be >= 0"]),
    ({"cg_steps": 2.5}, ["--cg-steps", "an integer"]),
    ({"task_chunk": 0}, ["--task-chunk must be >= 1"]),
    ({"test_lr": float("inf")}, ["--test-lr"]),
    ({"learn_l2": "yes"}, ["learn_l2 must be a bool"]),
    ({"inner": 3}, ["inner must be a str"]),
    ({"extra": None}, ["extra must be a dict", "NoneType"]),
])
def test_algo_config_refuses_bad_values_in_one_line(kwargs, needles):
    with pytest.raises(UsageError) as e:
        AlgoConfig(**kwargs)
    one_line(e, *needles)


def test_algo_config_defaults_and_nones_unchanged():
    cfg = AlgoConfig(inner=None, inner_solver=None, implicit=None, learn_l2=None, l2=None, prox=None, amp=None)
    assert (cfg.inner_steps, cfg.inner_lr, cfg.cg_steps, cfg.cg_tol, cfg.inner_tol, cfg.test_steps, cfg.test_lr,
            cfg.task_chunk) == (20, 0.1, 20, 1e-10, 1e-6, 20, 0.05, 1)
    assert not (cfg.warm_start or cfg.recompute_features or cfg.first_order or cfg.plain_inner or cfg.compile)
    assert cfg.extra == {} and not cfg.batched
    with pytest.raises(UsageError, match="--cg-steps must be >= 0"):
        cfg.cg_steps = -1  # assigned after construction: checked on assignment
    assert cfg.cg_steps == 20


def test_every_setting_has_help_and_a_known_type():
    for cls in (RunConfig, AlgoConfig, bench.BenchSettings):
        for f in cli_settings(cls):
            assert help_of(cls, f.name).strip(), (cls.__name__, f.name)
            base, _ = kind(f)
            assert base in ("int", "float", "str", "bool"), (cls.__name__, f.name, f.type)
            if base in ("int", "float"):
                assert f.metadata["range"] is not None, (cls.__name__, f.name)
        check_settings(cls())  # the defaults fit their own declarations


# -- RunConfig: holds an AlgoConfig, config.json stays flat -------------------------------------------------------
def test_old_flat_config_json_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG))
    cfg = RunConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert isinstance(cfg.algo_settings, AlgoConfig)
    assert cfg.algo_settings.inner_steps == cfg.inner_steps == 3 and cfg.algo_settings.test_steps == 7
    assert cfg.ways == 3 and cfg.seed == 5 and cfg.width == 4
    assert cfg.to_dict() == {**OLD_CONFIG, "prefetch": 2, "project_head": None}  # the same flat keys and values written back, and
    # the settings declared since with their defaults
    assert cfg.algo_config() == cfg.algo_settings and cfg.algo_config() is not cfg.algo_settings
    cfg.test_lr = 0.2  # flat writes reach the AlgoConfig
    assert cfg.algo_settings.test_lr == 0.2 and "test_lr" not in vars(cfg)
    # keys of a newer mrml are left out on loading (as before); an unknown keyword is refused
    assert RunConfig.from_dict({**OLD_CONFIG, "from_the_future": 1}) == RunConfig.from_dict(OLD_CONFIG)
    with pytest.raises(UsageError, match="unknown setting 'inner_stepz'"):
        RunConfig(inner_stepz=3)
    with pytest.raises(UsageError, match="--inner-steps must be >= 0"):
        RunConfig.from_dict({**OLD_CONFIG, "inner_steps": -2})


def test_resolve_layers_defaults_preset_file_explicit():
    cfg = RunConfig.resolve({"preset": "cifar-fs", "ways": 3})
    assert cfg.ways == 3 and cfg.outer_lr == 1e-4 and cfg.inner_solver == "gd" and cfg.shots == 5
    cfg = RunConfig.resolve({"ways": 3}, {"preset": "cifar-fs", "shots": 2, "inner_steps": 4})
    assert (cfg.ways, cfg.shots, cfg.inner_steps, cfg.outer_lr) == (3, 2, 4, 1e-4)
    cfg = RunConfig.resolve({"inner_steps": 9}, {"inner_steps": 4})
    assert cfg.inner_steps == 9
    with pytest.raises(UsageError, match="unknown setting 'nope'"):
        RunConfig.resolve({"nope": 1})


def test_preset_keys_are_settings():
    names = {f.name for f in fields(RunConfig)} | {f.name for f in fields(AlgoConfig)}
    for name, preset in PRESETS.items():
        keys = set(preset) - {"algos"} | {k for per in preset.get("algos", {}).values() for k in per}
        assert keys <= names, (name, keys - names)
        for algo in list(preset.get("algos", {})) + ["mrml"]:
            RunConfig.resolve({"preset": name, "algo": algo})  # every preset's values fit the declarations


# -- the command line, made from the declarations --------------------------------------------------------------
def train_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_setting_is_one_train_option_with_its_help():
    actions = [a for a in train_parser()._actions if a.option_strings]
    by_option = {}
    for a in actions:
        for o in a.option_strings:
            assert o not in by_option, f"{o} declared twice"
            by_option[o] = a
    settings = [(cls, f) for cls in (RunConfig, AlgoConfig) for f in cli_settings(cls)]
    assert len({f.name for _, f in settings}) == len(settings)  # no name in both classes
    for cls, f in settings:
        a = by_option[flag(f.name)]
        assert a.dest == f.name and a.help == f.metadata["help"] and a.default is None, f.name
        dests = [x for x in actions if x.dest == f.name]
        if f.metadata["no_help"]:
            assert by_option["--no-" + flag(f.name)[2:]].help == f.metadata["no_help"]
            assert len(dests) == 2 and sorted(isinstance(x, argparse._StoreTrueAction) for x in dests) == [False, True]
            assert any(isinstance(x, argparse._StoreFalseAction) for x in dests)
        else:
            assert len(dests) == 1, f.name
        if kind(f)[0] in ("int", "float"):
            assert a.type is {"int": int, "float": float}[kind(f)[0]]
    others = {a.dest for a in actions} - {f.name for _, f in settings}
    assert others == {"help", "config", "resume", "no_progress"}
    assert set(OLD_TRAIN_OPTIONS) <= set(by_option)
    assert set(cli.train_settings()) == {f.name for _, f in settings}


def test_bench_reuses_the_train_declarations():
    p = argparse.ArgumentParser()
    from mrml.settings import add_options
    add_options(p, bench.BenchSettings)
    helps = {a.dest: a.help for a in p._actions}
    for name in ("ways", "shots", "query", "meta_batch", "backbone", "width", "device", "seed", "data_root"):
        assert helps[name] == help_of(RunConfig, name), name
    assert helps["cg_steps"] == help_of(AlgoConfig, "cg_steps")
    s = bench.BenchSettings()
    assert (s.shots, s.query, s.meta_batch, s.cg_steps, s.repeats, s.dataset) == (5, 5, 4, 20, 3, "synthetic")
    with pytest.raises(UsageError, match="--repeats must be >= 1"):
        check_settings(bench.BenchSettings(repeats=0))


def test_no_algo_setting_is_declared_twice():
    """Besides algo_config.py, no file declares an AlgoConfig field as an option, a help entry or a range."""
    names = [f.name for f in cli_settings(AlgoConfig)]
    types = {f.name: str(f.type) for f in cli_settings(AlgoConfig)}  # a field of the same name and type
    files = [p for p in (ROOT / "src" / "mrml").rglob("*.py") if p.name != "algo_config.py"]
    files.append(ROOT / "benchmarks" / "speed.py")
    exempt: set[tuple[str, str]] = set()
    for path in files:
        text = path.read_text()
        for n in names:
            opt = "--" + n.replace("_", "-")
            # an option (unless its help reuses the declaration: help_of), a range, a help table entry, a dataclass field
            patterns = [rf"add_argument\(\s*['\"]{re.escape(opt)}['\"](?![^\n]*help_of\()", rf"Range\(\s*['\"]{n}['\"]",
                        rf"['\"]{n}['\"]\s*:\s*\(\s*(int|float|str)\b",
                        rf"^    {n}\s*:\s*{re.escape(types[n])}\s*=(?!\s*like\()"]
            for pat in patterns:
                m = re.search(pat, text, flags=re.M)
                if m and (path.name, opt) not in exempt:
                    line = text[: m.start()].count("\n") + 1
                    pytest.fail(f"{path.relative_to(ROOT)}:{line} declares {n} again: {m.group(0)!r}")
    assert not hasattr(cli, "TRAIN_OPTIONS") and not hasattr(cli, "TRAIN_FLAGS")
    import mrml.validation as validation
    assert not hasattr(validation, "RUN_RANGES") and not hasattr(validation, "BENCH_RANGES")


# -- --config FILE ----------------------------------------------------------------------------------------------
def test_config_round_trip_reproduces_the_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *TINY, "--iterations", "2", "--out", str(a)]) == 0
    assert cli.main(["train", "--config", str(a / "config.json"), "--out", str(b), "--iterations", "2",
                     "--no-progress"]) == 0
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca.pop("out") == str(a) and cb.pop("out") == str(b)
    assert ca == cb
    fa, fb = (json.loads((d / "final.json").read_text()) for d in (a, b))
    for key in ("accuracy", "loss", "ci95", "episodes", "iterations"):
        assert fa[key] == fb[key], key
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    capsys.readouterr()


def test_config_file_flags_win_and_out_is_ignored(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**OLD_CONFIG, "out": str(tmp_path / "old")}))
    base = read_config_file(path)
    assert "out" not in base
    cfg = RunConfig.resolve({"ways": 2, "inner_steps": 1}, base)
    assert (cfg.ways, cfg.inner_steps, cfg.shots, cfg.test_steps, cfg.out) == (2, 1, 1, 7, None)


@pytest.mark.parametrize("content, needle", [
    (json.dumps({"ways": 3, "inner_stepz": 4}), "unknown setting 'inner_stepz'"),
    ("[1, 2]", "one JSON object"),
    ("{not json", "not valid JSON"),
    (json.dumps({"amp": "fp8"}), "--amp must be bf16 or fp16"),
    (json.dumps({"ways": "5"}), "ways: --ways must be an integer (got '5')"),
    (json.dumps({"ways": None}), "ways: --ways must be given a value (got None)"),
    (json.dumps({"ways": [5]}), "ways: --ways must be an integer (got [5])"),
    (json.dumps({"outer_lr": "0.1"}), "outer_lr: --outer-lr must be a number (got '0.1')"),
    (json.dumps({"augment": "yes"}), "augment: setting augment must be a bool (got 'yes')"),
    (json.dumps({"dataset": None}), "dataset: --dataset must be given a value"),
    (json.dumps({"inner_steps": -1}), "inner_steps: --inner-steps must be >= 0"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert cli.main(["train", "--config", str(path), "--iterations", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "r").exists()


def test_config_missing_file_and_with_resume(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "none.json"), "--iterations", "0"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path), "--config", str(tmp_path / "c.json")]) == 2
    assert "only --iterations may change" in capsys.readouterr().err


def test_deeply_nested_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text('{"ways": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cli.main(["train", "--config", str(path), "--iterations", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "nested too deeply" in err, err


def test_config_file_values_are_checked_with_the_option_types():
    """The checks read_config_file applies are the options' own: a value the command line refuses is refused."""
    from mrml.settings import check_setting, field_of
    for name, bad in (("ways", "5"), ("ways", None), ("ways", 2.0), ("ways", True), ("l2", "0.1"), ("amp", 3),
                      ("learn_l2", "no")):
        cls = AlgoConfig if name in {f.name for f in fields(AlgoConfig)} else RunConfig
        with pytest.raises(UsageError):
            check_setting(field_of(cls, name), bad)
    check_setting(field_of(AlgoConfig, "l2"), None)  # optional: the algorithm's default
    check_setting(field_of(AlgoConfig, "l2"), 1)  # an int is a number


def test_sinusoid_default_backbone_is_mlp_and_old_configs_read_back_as_what_ran():
    assert RunConfig(dataset="sinusoid").backbone == "mlp"
    assert RunConfig.resolve({"dataset": "sinusoid"}).backbone == "mlp"
    assert RunConfig(dataset="sinusoid", backbone="conv4").backbone == "conv4"  # explicit: kept (refused when built)
    assert RunConfig(dataset="tiny").backbone == "conv4"
    old = {**OLD_CONFIG, "dataset": "sinusoid", "ways": 1, "backbone": "conv4"}  # written when conv4 meant mlp there
    assert RunConfig.from_dict(old).backbone == "mlp"


def test_every_switch_pair_excludes_itself():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    pairs = [f.name for cls in (RunConfig, AlgoConfig) for f in cli_settings(cls) if f.metadata.get("no_help")]
    assert {"learn_l2", "prox"} <= set(pairs)
    for name in pairs:
        with pytest.raises(UsageError, match="not allowed with argument"):
            sub.parse_args([flag(name), "--no-" + flag(name)[2:]])
        assert getattr(sub.parse_args(["--no-" + flag(name)[2:]]), name) is False
        assert getattr(sub.parse_args([flag(name)]), name) is True
