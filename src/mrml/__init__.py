"""mrml: memory-reduced meta-learning (Yang, Ma, Yu, AAAI 2025) and its baselines."""
from __future__ import annotations

__version__ = "0.1.0"
