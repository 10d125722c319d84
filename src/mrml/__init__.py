"""mrml: memory-reduced meta-learning (Yang, Ma, Yu, AAAI 2025) and its baselines.

    from mrml import MRML, AlgoConfig
    learner = MRML(model, "classification", AlgoConfig(inner="head"))
    learner.meta_gradient(episodes); optimizer.step()
"""
from __future__ import annotations

from .algorithms import ALGORITHMS, AlgoConfig, MetaAlgorithm, StepStats, build_algorithm
from .algorithms import ANIL, FOMAML, IMAML, ITDBiO, MAML, MRML, MetaSGD, ProtoNet, Reptile
from .data import Episode, build_dataset, episode_rng
from .functional import HypergradientInfo, InnerSolveInfo, hypergradient, solve_inner
from .implicit import CGInfo, cg_solver, conjugate_gradient
from .learner_io import load_learner, save_learner
from .memory import PeakMemoryMeter
from .runs import LoadedRun, load_run

__version__ = "0.1.0"

__all__ = ["ALGORITHMS", "ANIL", "AlgoConfig", "CGInfo", "Episode", "FOMAML", "HypergradientInfo", "IMAML", "ITDBiO",
           "InnerSolveInfo", "LoadedRun", "MAML", "MRML", "MetaAlgorithm", "MetaSGD", "PeakMemoryMeter", "ProtoNet", "Reptile",
           "StepStats", "build_algorithm", "build_dataset", "cg_solver", "conjugate_gradient", "episode_rng",
           "hypergradient", "load_learner", "load_run", "save_learner", "solve_inner"]
