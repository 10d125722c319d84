"""`AlgoConfig`: the settings the algorithms share, each declared once (default, help, allowed values).

The same declarations make `mrml train`'s algorithm options and their checks (`mrml.settings`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from difflib import get_close_matches
from typing import Any

from ..errors import UsageError
from ..functional import IMPLICIT_METHODS as IMPLICIT_SYSTEMS
from ..settings import check_settings, setting
from ..solvers.newton import INNER_SOLVERS
from ..validation import LR_MAX, floats, ints

AMP_KINDS = ("bf16", "fp16")
STEPS_MAX = 10**6


@dataclass
class AlgoConfig:
    """Settings shared by the algorithms (each uses the ones that apply to it); checked when made and
    on every later assignment (`learner.config.inner_steps = -3` raises, the old value kept).

    A field left None is resolved by the algorithm (e.g. mrml's inner part is its head, its inner
    solver newton). A value out of its range or choices raises a one-line `mrml.errors.UsageError`.
    `mrml.settings.help_of(AlgoConfig, name)` is a field's documentation (also its `--help` line).

    Attributes (grouped; each field's help text, in its metadata, says the rest):
        inner, inner_steps, inner_solver, inner_tol, inner_lr, plain_inner: the inner part y and how
            it is fitted (K steps at alpha, or an exact solve to a tolerance).
        l2, learn_l2, prox: the inner-loss strength lambda (learned or fixed) and its centre.
        project_head: mrml's meta-trained wider form (`mrml.algorithms.projected`).
        implicit, cg_steps, cg_tol, warm_start: the linear system of the implicit hypergradient.
        first_order, recompute_features: forms of the unrolled baselines / the paper-faithful trunk.
        test_steps, test_lr: test-time adaptation of mrml, imaml and itd-bio; maml, fomaml, anil,
            reptile and metasgd adapt with their training loop (inner_steps at inner_lr) unless
            extra={"test_adaptation": "test"}.
        task_chunk, amp, compile: speed (mrml's task-batched path).
        extra: algorithm-specific settings by name (Python API only).

    Example:
        >>> from mrml.errors import UsageError
        >>> from mrml.settings import help_of
        >>> help_of(AlgoConfig, "cg_steps")
        'conjugate-gradient iterations N'
        >>> AlgoConfig(inner_steps=5, l2=0.5).inner_steps
        5
        >>> try:
        ...     AlgoConfig(amp="fp8")
        ... except UsageError as e:
        ...     print(e)
        --amp must be bf16 or fp16 (got 'fp8')
        >>> cfg = AlgoConfig()
        >>> try:
        ...     cfg.inner_steps = -3
        ... except UsageError as e:
        ...     print(e, "| kept:", cfg.inner_steps)
        --inner-steps must be >= 0 and <= 1000000 (an integer; got -3) | kept: 20
    """

    inner: str | None = setting(None, "inner part adapted per task: head, last-block, all, or parameter name "
                                      "prefixes (default: the algorithm's, head for mrml)")
    inner_steps: int = setting(20, "inner gradient steps K (gd), or the iteration cap of an exact inner solve",
                               range=ints(0, STEPS_MAX))
    inner_solver: str | None = setting(
        None, "inner solver: newton (mrml's default: solved to --inner-tol, --inner-steps the cap) or gd "
              "(K gradient steps: Algorithm 1 as written)", choices=INNER_SOLVERS,
        hint="mrml and imaml accept --inner-solver newton or gd, the unrolled methods gd")
    inner_tol: float = setting(1e-6, "exact inner solve stops at ||d_y g|| <= tol * max(1, ||d_y g(y_0)||)",
                               range=floats(0, LR_MAX, open_low=True))
    implicit: str | None = setting(None, "implicit system: direct (linear head; the default there) | cg (default "
                                         "elsewhere) | damped | neumann (see README)", choices=IMPLICIT_SYSTEMS)
    learn_l2: bool | None = setting(
        None, "learn lambda (log-parametrised) as an outer variable, starting from --l2 (mrml's default "
              "with the exact solver; --no-learn-l2 keeps it fixed)",
        no_help="keep lambda fixed at --l2 (mrml learns it by default with its exact solver)")
    inner_lr: float = setting(0.1, "inner step size alpha", range=floats(0, LR_MAX, open_low=True))
    l2: float | None = setting(None, "lambda: ridge (head) or proximal strength of the inner loss (default: the "
                                     "algorithm's, 0.1 for mrml: the starting value when learned)",
                               range=floats(0, LR_MAX))
    prox: bool | None = setting(None, "proximal inner loss lam/2||y - y0||^2 with a learned centre y0 (default: "
                                      "iff the inner part goes beyond the last stage)",
                                no_help="ridge inner loss (centre 0)")
    project_head: bool | None = setting(
        None, "mrml with a wider inner part (--inner last-block or all): solve its linear head exactly first "
              "(variable projection), then K gradient steps on the whole part; the hypergradient of those K steps, "
              "start included, by --implicit neumann (its default) or damped, in flat memory (see README)",
        no_help="the wider part's plain gd form (K steps from the learned init, then the implicit system)")
    cg_steps: int = setting(20, "conjugate-gradient iterations N", range=ints(0, STEPS_MAX))
    cg_tol: float = setting(1e-10, "relative CG residual at which the solve stops early", range=floats(0, LR_MAX))
    warm_start: bool = setting(False, "keep each task's inner solution and CG vector across iterations (fixed "
                                      "task sets)")
    recompute_features: bool = setting(False, "paper-faithful form: re-run the backbone with gradient in every "
                                              "inner step")
    test_steps: int = setting(20, "test-time adaptation steps of mrml, imaml and itd-bio (newton: the solve's "
                                  "cap); maml, fomaml, anil, reptile and metasgd adapt with --inner-steps",
                              range=ints(0, STEPS_MAX))
    test_lr: float = setting(0.05, "test-time adaptation step size of mrml, imaml and itd-bio (gd); maml, fomaml, "
                                   "anil and reptile adapt with --inner-lr, metasgd with its learned step sizes",
                             range=floats(0, LR_MAX, open_low=True))
    first_order: bool = setting(False, "drop second-order terms where the algorithm has them")
    plain_inner: bool = setting(False, "plain inner gradient descent: no divergence guard (the paper's loop; no "
                                       "per-step GPU sync)")
    # -- speed (mrml; see mrml.algorithms.batched) ---------------------------------------------
    task_chunk: int = setting(1, "tasks per batched pass of mrml (every form); 1 (default): one at a time "
                                 "(least memory; on CPU chunks gain little)", range=ints(1, 10**5))
    amp: str | None = setting(None, "mixed precision for the backbone: bf16 or fp16 (CUDA; bf16 also on CPU; CG "
                                    "stays float32)", choices=AMP_KINDS)
    compile: bool = setting(False, "torch.compile the backbone (falls back to eager with a warning where it cannot)")
    # ------------------------------------------------------------------------------------------
    extra: dict[str, Any] = setting(help="algorithm-specific settings by name (Python API only)", cli=False,
                                    default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_validated", True)

    def __setattr__(self, name: str, value: Any) -> None:
        """An assignment after construction is checked as construction checks (the same one-line
        UsageError, the old value kept); a name that is no setting is refused."""
        if not self.__dict__.get("_validated"):  # the dataclass's __init__: __post_init__ checks everything
            object.__setattr__(self, name, value)
            return
        if name not in _FIELD_NAMES and not name.startswith("_"):
            near = get_close_matches(name, _FIELD_NAMES, n=1)
            raise UsageError(f"AlgoConfig has no setting {name!r}" + (f": did you mean {near[0]!r}?" if near else ""))
        old = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except UsageError:
            object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        """Check the settings again (after fields were assigned); one-line UsageError for the first bad one."""
        check_settings(self)
        if not isinstance(self.extra, dict):
            raise UsageError(f"extra must be a dict of options (got {type(self.extra).__name__}): use extra={{}} or "
                             "drop it")

    @property
    def batched(self) -> bool:
        """Whether the settings ask for the task-batched path (chunks, mixed precision or compile)."""
        return self.task_chunk > 1 or bool(self.amp) or self.compile

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_NAMES = tuple(f.name for f in fields(AlgoConfig))
