"""Runs as objects: mrml.load_run, LoadedRun.evaluate on other data, `mrml eval --dataset`, `mrml export`."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import fixtures_formats as fx
import mrml
from mrml.checkpoint import save_checkpoint
from mrml.cli import main
from mrml.config import RunConfig
from mrml.data import build_dataset, episode_rng, from_arrays
from mrml.errors import UsageError
from mrml.evaluate import meta_test
from mrml.models import build_model
from mrml.train import build_run, restore, train

TINY = {"ways": 3, "shots": 1, "query": 2, "width": 4, "meta_batch": 1, "val_every": 2, "val_episodes": 2,
        "test_episodes": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory):
    """A 3-way 1-shot mrml run on glyphs (1x28x28), two iterations: enough to have trained weights and a learned lambda."""
    out = tmp_path_factory.mktemp("glyph_run")
    train(RunConfig.resolve({"dataset": "glyphs", "iterations": 2, "out": str(out), **TINY}), progress=False,
          stream=io.StringIO())
    return out


def digits(per_class: int = 20, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten 'handwritten' digit classes: PIL's default font drawn at random offsets, with noise (uint8, bright on dark)."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default()
    images, labels = [], []
    for d in range(10):
        for _ in range(per_class):
            img = Image.new("L", (size, size), 0)
            dx, dy = rng.integers(6, 16, size=2)
            ImageDraw.Draw(img).text((int(dx), int(dy)), str(d), fill=255, font=font)
            noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 20, (size, size))
            images.append(np.clip(noisy, 0, 255).astype(np.uint8))
            labels.append(d)
    return np.stack(images), np.array(labels)


def test_load_run_restores_weights_learner_and_config(glyph_run):
    state = torch.load(glyph_run / "checkpoint.pt", weights_only=True)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    run = mrml.load_run(glyph_run)
    assert torch.equal(torch.random.get_rng_state(), before)  # loading does not reseed the caller's generator
    assert isinstance(run, mrml.LoadedRun) and isinstance(run.learner, mrml.MRML) and run.learner.model is run.model
    assert run.input_shape == (1, 28, 28) and run.iteration == 2 and run.config.ways == 3 and run.config.dataset == "glyphs"
    assert state["model_spec"] == {"backbone": "conv4", "width": 4, "kind": "classification", "input_shape": [1, 28, 28],
                                   "outputs": 3}
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name
    assert run.learned_l2 == pytest.approx(math.exp(float(state["algo"]["log_l2"])), rel=1e-6)
    assert run.learned_l2 != pytest.approx(0.1)  # moved by the two outer steps from its start


def test_evaluate_matches_the_run_test_and_the_ci_formula(glyph_run):
    run = mrml.load_run(glyph_run)
    ds = build_dataset("glyphs")
    result = run.evaluate(ds, "test", episodes=6, seed=3)
    # the same numbers as the meta-test of the training code
    state = torch.load(glyph_run / "checkpoint.pt", weights_only=True)
    cfg = RunConfig.from_dict(state["config"])
    cfg.device = "cpu"
    ref = build_run(cfg)
    restore(ref, state, glyph_run, optimizer=False)
    expect = meta_test(ref.algo, ref.source, "test", 3, 1, 2, 6, 3, ref.device)
    assert {k: result[k] for k in expect} == expect
    accs = [run.learner.evaluate(ds.episode("test", 3, 1, 2, episode_rng(3, "test", i))).accuracy for i in range(6)]
    assert result["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert result["ci95"] == pytest.approx(1.96 * np.std(accs, ddof=1) / math.sqrt(6), abs=1e-12)
    assert (result["ways"], result["shots"], result["query"], result["dataset"], result["episodes"]) == (3, 1, 2, "glyphs", 6)


def test_digits_from_arrays_evaluated_reproducibly(glyph_run):
    images, labels = digits()
    ds = from_arrays(images, labels, splits="test", image_size=28, name="digits")
    run = mrml.load_run(glyph_run)
    first = run.evaluate(ds, episodes=8, seed=5)
    assert 0 <= first["accuracy"] <= 1 and first["episodes"] == 8 and first["dataset"] == "digits"
    assert run.evaluate(ds, episodes=8, seed=5) == first
    assert mrml.load_run(glyph_run).evaluate(ds, episodes=8, seed=5) == first  # a fresh load: the same number
    # 32x32 images are fitted to the run's 28x28 input on the fly, the same way from_arrays resizes them
    raw = from_arrays(images, labels, splits="test", name="digits")
    assert run.evaluate(raw, episodes=8, seed=5) == first
    # other episode shapes: a 5-way evaluation of a 3-way run (mrml's head is solved per task, never learned)
    five = run.evaluate(ds, episodes=4, ways=5, shots=2, query=3, seed=5)
    assert (five["ways"], five["shots"], five["query"]) == (5, 2, 3) and 0 <= five["accuracy"] <= 1
    with pytest.raises(UsageError, match="has no classes"):
        run.evaluate(ds, split="train", episodes=2)
    with pytest.raises(UsageError, match="is a classification run; dataset 'sinusoid' is regression"):
        run.evaluate(build_dataset("sinusoid"), episodes=2)
    with pytest.raises(UsageError, match="episodes must be >= 1"):
        run.evaluate(ds, episodes=0)


def test_a_learned_head_keeps_its_ways(tmp_path):
    out = tmp_path / "maml"
    train(RunConfig.resolve({"dataset": "tiny", "algo": "maml", "iterations": 1, "inner_steps": 1, "out": str(out),
                             **TINY}), progress=False, stream=io.StringIO())
    run = mrml.load_run(out)
    ds = build_dataset("tiny")
    assert 0 <= run.evaluate(ds, episodes=2)["accuracy"] <= 1
    with pytest.raises(UsageError, match=r"maml learned head.weight for 3-way episodes .*\(--ways 3\)"):
        run.evaluate(ds, episodes=2, ways=2)


def test_not_a_run_and_damaged_spec(tmp_path, glyph_run):
    with pytest.raises(UsageError, match="no checkpoint.pt in"):
        mrml.load_run(tmp_path)
    state = torch.load(glyph_run / "checkpoint.pt", weights_only=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_checkpoint(bad / "checkpoint.pt", {**state, "model_spec": {"backbone": "conv4", "input_shape": [1, -28]}})
    with pytest.raises(UsageError, match="is damaged: its model_spec"):
        mrml.load_run(bad)
    # checkpoints written before model_spec existed: the input shape comes from the run's dataset
    old = tmp_path / "old"
    old.mkdir()
    save_checkpoint(old / "checkpoint.pt", {k: v for k, v in state.items() if k not in ("model_spec", "format")})
    loaded, new = mrml.load_run(old), mrml.load_run(glyph_run)
    assert loaded.spec == new.spec
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded.model(x), new.model(x))


def one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    last = err.strip().replace("\r", "\n").splitlines()[-1]  # earlier: progress bars of what was read
    assert code == 2 and "Traceback" not in err and last.startswith("error: ") and needle in last, err


def test_cli_eval_on_omniglot_and_cifar_fs_files(glyph_run, tmp_path, capsys):
    root = fx.omniglot(tmp_path / "omni", fx.all_characters(fx.OMNIGLOT_SPLIT))
    split = fx.write_split(tmp_path / "omni.json", fx.OMNIGLOT_SPLIT)
    args = ["eval", str(glyph_run), "--dataset", "omniglot", "--data-root", str(root), "--split-file", str(split),
            "--episodes", "4", "--query", "3", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "omniglot" and out["episodes"] == 4 and 0 <= out["accuracy"] <= 1
    assert (out["ways"], out["shots"], out["query"]) == (3, 1, 3) and out["iteration"] == 2 and out["algo"] == "mrml"
    assert {"split", "seed", "loss", "loss_ci95", "ci95", "run_dir", "test_steps", "test_lr"} <= set(out)
    assert main(args) == 0 and json.loads(capsys.readouterr().out) == out
    # the same numbers through the library: omniglot read at 28x28, the run's input
    omni = build_dataset("omniglot", root, split_file=str(split), image_size=28)
    lib = mrml.load_run(glyph_run).evaluate(omni, episodes=4, query=3, seed=0)
    assert {k: out[k] for k in lib} == lib
    # CIFAR-FS images (3x32x32) to the run's 1x28x28
    cifar = fx.cifar100_python(tmp_path / "cifar", fx.all_characters(fx.CIFAR_SPLIT))
    csplit = fx.write_split(tmp_path / "cifar.json", fx.CIFAR_SPLIT)
    assert main(["eval", str(glyph_run), "--dataset", "cifar-fs", "--data-root", str(cifar), "--split-file", str(csplit),
                 "--episodes", "3", "--shots", "2", "--query", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dataset"] == "cifar-fs" and 0 <= out["accuracy"] <= 1 and out["shots"] == 2
    # the run's own dataset, as before
    assert main(["eval", str(glyph_run), "--episodes", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "glyphs"
    assert main(["eval", str(glyph_run), "--dataset", "omniglot", "--data-root", str(root), "--split-file", str(split),
                 "--episodes", "2", "--query", "3"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    one_line_error(capsys, main(["eval", str(glyph_run), "--dataset", "mnist"]), "unknown dataset 'mnist': expected one of")
    one_line_error(capsys, main(["eval", str(glyph_run), "--dataset", "omniglot"]), "pass --data-root PATH")
    one_line_error(capsys, main(["eval", str(glyph_run), "--dataset", "omniglot", "--data-root", str(root),
                                 "--split-file", str(split), "--ways", "4"]), "lower --ways")


def test_export_state_dict_rebuilds_the_model(glyph_run, tmp_path, capsys):
    target = tmp_path / "model.pt"
    assert main(["export", str(glyph_run), "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    weights = torch.load(target, weights_only=True)
    run = mrml.load_run(glyph_run)
    assert type(weights) is dict and all(isinstance(v, torch.Tensor) for v in weights.values())
    assert list(weights) == list(run.model.state_dict())
    assert f"{len(weights)} tensors" in printed and "build_model('conv4', (1, 28, 28), 3, width=4)" in printed
    assert f"learned lambda (inner ridge strength): {run.learned_l2:.6g}" in printed
    fresh = build_model("conv4", (1, 28, 28), 3, width=4)
    fresh.load_state_dict(weights, strict=True)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(fresh(x), run.model(x))
    assert torch.equal(fresh.backbone(x), run.model.backbone(x))
    one_line_error(capsys, main(["export", str(glyph_run), "--out", str(target)]), "already exists: pass --force")
    trunk = tmp_path / "trunk.pt"
    assert main(["export", str(glyph_run), "--out", str(trunk), "--trunk-only", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trunk_only"] and info["tensors"] == len(weights) - 2 and info["input_shape"] == [1, 28, 28]
    body = build_model("conv4", (1, 28, 28), 3, width=4).backbone
    body.load_state_dict(torch.load(trunk, weights_only=True), strict=True)
    assert torch.equal(body(x), run.model.backbone(x))
    assert main(["export", str(glyph_run), "--out", str(target), "--force", "--trunk-only"]) == 0
    assert list(torch.load(target, weights_only=True)) == list(body.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "trunk.pt"]  # no temp files left
    capsys.readouterr()
    one_line_error(capsys, main(["export", str(glyph_run), "--out", str(tmp_path / "no" / "m.pt")]), "does not exist")
    one_line_error(capsys, main(["export", str(tmp_path), "--out", str(tmp_path / "m.pt")]), "no checkpoint.pt")
