"""The CUDA paths: hypergradients on the GPU equal the CPU ones, the task-batched path equals the
per-task loop, mixed precision and torch.compile run, the memory meter agrees with CUDA's allocator.

Skipped where no CUDA device is present (CI); run on a GPU machine with
`python -m pytest tests/test_cuda.py` (benchmarks/gpu_check.sh does, before the CUDA benchmarks).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from mrml.algorithms import ALGORITHMS, AlgoConfig
from mrml.data.base import episode_rng
from mrml.memory import PeakMemoryMeter
from mrml.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"


@pytest.fixture(autouse=True)
def _exact_cuda_maths():
    """No TF32 in convolutions and matmuls: comparisons below are at float32/float64 rounding."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make(device, dtype, algo="mrml", **cfg):
    torch.manual_seed(0)
    model = build_model("conv4", (1, 16, 16), 3, 8).to(device, dtype)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return model, ALGORITHMS[algo](model, "classification", AlgoConfig(**cfg))


def episodes(tiny, device, dtype, n=4):
    return [tiny.episode("train", 3, 2, 3, episode_rng(0, "train", i)).to(device, dtype) for i in range(n)]


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double().cpu() for p in model.parameters() if p.grad is not None])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("algo", ["mrml", "anil", "maml", "imaml"])
def test_cuda_float64_equals_cpu(tiny, algo):
    cfg = dict(inner_steps=5, cg_steps=10, l2=1.0) if algo in ("mrml", "imaml") else dict(inner_steps=3, inner_lr=0.3)
    if algo == "imaml":
        cfg["l2"] = 20.0
    cpu_model, cpu = make("cpu", torch.float64, algo, **cfg)
    gpu_model, gpu = make(CUDA, torch.float64, algo, **cfg)
    s0 = cpu.meta_gradient(episodes(tiny, "cpu", torch.float64))
    s1 = gpu.meta_gradient(episodes(tiny, CUDA, torch.float64))
    assert rel(grads(gpu_model), grads(cpu_model)) < 1e-10
    assert s1.loss == pytest.approx(s0.loss, rel=1e-10)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [2, 4])
def test_cuda_task_chunk_equals_per_task(tiny, dtype, rtol, chunk):
    cfg = dict(inner_steps=10, l2=1.0, cg_steps=40, cg_tol=1e-9 if dtype == torch.float64 else 1e-5)
    ref_model, ref = make(CUDA, dtype, **cfg)
    model, algo = make(CUDA, dtype, task_chunk=chunk, **cfg)
    eps = episodes(tiny, CUDA, dtype)
    s0, s1 = ref.meta_gradient(eps), algo.meta_gradient(eps)
    assert rel(grads(model), grads(ref_model)) < rtol
    assert s1.loss == pytest.approx(s0.loss, rel=rtol)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_cuda_amp_runs_and_stays_close(tiny, amp, chunk):
    eps = episodes(tiny, CUDA, torch.float32)
    ref_model, ref = make(CUDA, torch.float32, l2=1.0, cg_steps=5)
    model, algo = make(CUDA, torch.float32, l2=1.0, cg_steps=5, amp=amp, task_chunk=chunk)
    s0, s1 = ref.meta_gradient(eps), algo.meta_gradient(eps)
    g = grads(model)
    assert torch.isfinite(g).all()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    assert rel(g, grads(ref_model)) < 0.1  # half-precision trunk: close, not equal
    assert s1.loss == pytest.approx(s0.loss, rel=2e-2)


def test_cuda_compile_matches_eager(tiny):
    eps = episodes(tiny, CUDA, torch.float32)
    ref_model, ref = make(CUDA, torch.float32, l2=1.0, cg_steps=5, task_chunk=4)
    model, algo = make(CUDA, torch.float32, l2=1.0, cg_steps=5, task_chunk=4, compile=True)
    ref.meta_gradient(eps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        algo.meta_gradient(eps)
    fell_back = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
    assert not fell_back, fell_back
    assert algo._task_batched.trunk.compiled is not None
    assert rel(grads(model), grads(ref_model)) < 1e-4  # fused kernels round differently


def test_cuda_plain_inner_equals_guarded_when_g_decreases(tiny):
    """`--plain-inner` (no per-step host sync) gives the guarded result where no step is taken back."""
    eps = episodes(tiny, CUDA, torch.float64)
    m0, a0 = make(CUDA, torch.float64, inner_steps=10, l2=1.0, cg_steps=20)
    m1, a1 = make(CUDA, torch.float64, inner_steps=10, l2=1.0, cg_steps=20, plain_inner=True)
    a0.meta_gradient(eps)
    a1.meta_gradient(eps)
    assert a0.last_inner_lr == a1.last_inner_lr
    assert rel(grads(m1), grads(m0)) < 1e-12


def test_cuda_memory_meter_agrees_with_the_allocator(tiny):
    model, algo = make(CUDA, torch.float32, algo="maml", inner_steps=5, inner_lr=0.3)
    eps = episodes(tiny, CUDA, torch.float32, n=2)
    algo.meta_gradient(eps)  # lazy initialisation outside the measurement
    torch.cuda.synchronize()
    with PeakMemoryMeter(CUDA) as meter:
        algo.meta_gradient(eps)
        torch.cuda.synchronize()
    rep = meter.report()
    assert rep.cuda_peak_mb is not None and rep.peak_mb > 0
    # the allocator also holds cuDNN workspaces and rounds blocks up (512 B): the meter's storages are
    # a part of what it holds, and most of it
    assert 0.5 * rep.cuda_peak_mb - 16.0 <= rep.peak_mb <= 1.1 * rep.cuda_peak_mb + 1.0, (rep.peak_mb, rep.cuda_peak_mb)
