"""Coming from learn2learn, torchopt or higher: their calls and mrml's, every line run below as a doctest.

=========================================================  ==================================================
theirs                                                     mrml
=========================================================  ==================================================
l2l ``MAML(model, lr=a)``; ``maml.clone()``,               ``MAML(model, loss, AlgoConfig(inner_lr=a,
``learner.adapt(loss)`` x K, ``query_loss.backward()``      inner_steps=K))``; ``learner.meta_gradient([Episode
per task                                                    (...), ...])`` (mean over the tasks into ``.grad``)
``lr=``                                                    ``AlgoConfig(inner_lr=...)``
``first_order=True``                                       ``AlgoConfig(first_order=True)`` (or ``FOMAML``)
a plain inner loop, bit for bit                            ``AlgoConfig(plain_inner=True)`` (divergence guard off)
adapting at test time with the training loop               the default of MAML, FOMAML, ANIL, Reptile, MetaSGD;
                                                           ``test_steps``/``test_lr``: mrml, iMAML, ITD-BiO (or
                                                           ``extra={"test_adaptation": "test"}``)
``model.eval()`` before evaluating                         ``learner.evaluate(ep)`` / ``adapt``: dropout off,
                                                           modes restored (``mrml.models.modes``)
l2l ``MetaSGD(model, lr=a)``                               ``MetaSGD(model, loss, AlgoConfig(inner_lr=a))``
higher ``innerloop_ctx`` + ``diffopt.step`` unrolled       ``MAML`` (every parameter), ``ANIL(..., trunk=...)``
                                                           (the head only)
torchopt ``custom_root(optimality_fn, solve=...)``         ``mrml.hypergradient(g, f, x, y)``
torchopt ``linear_solve.solve_cg(...)``                    ``mrml.cg_solver(steps=..., tol=...)``
``torch.save(model.state_dict())``                         ``mrml.save_learner`` / ``mrml.load_learner`` (a
                                                           learner made in Python); ``mrml.load_run(folder)``
                                                           (a ``mrml train`` run)
=========================================================  ==================================================

A learn2learn-style MAML written out (functional, float64) and mrml's MAML give the same meta-gradient:

    >>> import tempfile, torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> from torch.func import functional_call
    >>> import mrml
    >>> from mrml import ANIL, MAML, AlgoConfig, Episode, MetaSGD
    >>> def net():
    ...     torch.manual_seed(0)
    ...     return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> g = torch.Generator().manual_seed(1)
    >>> labels = torch.arange(3).repeat(2)
    >>> ep = Episode(torch.randn(6, 4, generator=g, dtype=torch.float64), labels,
    ...              torch.randn(6, 4, generator=g, dtype=torch.float64), labels)
    >>> def l2l_style(model, lr, steps, first_order):  # clone(); adapt(loss) x steps; query loss backward
    ...     fast = dict(model.named_parameters())
    ...     for _ in range(steps):
    ...         loss = F.cross_entropy(functional_call(model, fast, (ep.support_x,)), ep.support_y)
    ...         grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
    ...         fast = {k: p - lr * d for (k, p), d in zip(fast.items(), grads)}
    ...     F.cross_entropy(functional_call(model, fast, (ep.query_x,)), ep.query_y).backward()
    ...     return [p.grad for p in model.parameters()]
    >>> def same(a, b):
    ...     return all(torch.allclose(u, v, rtol=1e-10, atol=1e-13) for u, v in zip(a, b))
    >>> for first_order in (False, True):
    ...     model = net()
    ...     learner = MAML(model, "classification", AlgoConfig(inner_lr=0.4, inner_steps=2, first_order=first_order,
    ...                                                        plain_inner=True))
    ...     _ = learner.meta_gradient([ep])
    ...     print(first_order, same([p.grad for p in model.parameters()], l2l_style(net(), 0.4, 2, first_order)))
    False True
    True True

Test-time adaptation of MAML is its training loop (``adapted_parameters`` = the fast weights, no graph);
which algorithms use ``test_steps`` instead:

    >>> fast = dict(net().named_parameters())
    >>> for _ in range(2):
    ...     loss = F.cross_entropy(functional_call(net(), fast, (ep.support_x,)), ep.support_y)
    ...     fast = {k: p - 0.4 * d for (k, p), d in zip(fast.items(), torch.autograd.grad(loss, list(fast.values())))}
    >>> learner = MAML(net(), "classification", AlgoConfig(inner_lr=0.4, inner_steps=2, plain_inner=True))
    >>> all(torch.allclose(learner.adapted_parameters(ep)[k], fast[k].detach(), rtol=1e-12) for k in fast)
    True
    >>> from mrml.settings import help_of
    >>> print(*help_of(AlgoConfig, "test_steps").split("; "), sep=chr(10))
    test-time adaptation steps of mrml, imaml and itd-bio (newton: the solve's cap)
    maml, fomaml, anil, reptile and metasgd adapt with --inner-steps

Evaluation needs no ``model.eval()``: dropout is off inside ``evaluate`` and the modes are restored:

    >>> drop = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    >>> learner = MAML(drop, "classification", AlgoConfig(inner_steps=2))
    >>> learner.evaluate(ep).loss == learner.evaluate(ep).loss, drop.training, drop[2].training
    (True, True, True)

Meta-SGD (learned per-entry step sizes, in ``outer_parameters()``); higher's unrolled loop on the head
only is ANIL:

    >>> learner = MetaSGD(net(), "classification", AlgoConfig(inner_lr=0.4, inner_steps=2))
    >>> {k: tuple(a.shape) for k, a in learner.alphas.items()}, float(learner.alphas["2.bias"][0].detach())
    ({'0.weight': (8, 4), '0.bias': (8,), '2.weight': (3, 8), '2.bias': (3,)}, 0.4)
    >>> ANIL(net(), "classification", AlgoConfig(inner_steps=2), trunk="0").config.inner
    '2.weight,2.bias'

torchopt's ``custom_root`` with ``solve_cg``: the implicit hypergradient at an inner solution y, with
mrml's own CG or a torchopt-style ``solve(matvec, b)``:

    >>> inner = lambda x, y, a: 0.5 * (y["w"] - x["s"] * a).pow(2).sum() + 0.5 * y["w"].pow(2).sum()
    >>> outer = lambda x, y, b: 0.5 * (y["w"] - b).pow(2).sum()
    >>> x = {"s": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}
    >>> a, b = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    >>> y, _ = mrml.solve_inner(inner, x, {"w": torch.zeros(2, dtype=torch.float64)}, a)
    >>> grads, _ = mrml.hypergradient(inner, outer, x, y, inner_batch=a, outer_batch=b)
    >>> same_cg, _ = mrml.hypergradient(inner, outer, x, y, inner_batch=a, outer_batch=b,
    ...                                 implicit=mrml.cg_solver(steps=10))
    >>> round(float(grads["s"]), 10), round(float(same_cg["s"]), 10)  # d f(y*(s)) / ds = <y* - b, a / 2>
    (1.5, 1.5)

Saving: ``save_learner`` keeps the model, the algorithm's state (Meta-SGD's alphas, a learned lambda) and
its settings; ``load_learner`` rebuilds it over a model built as before:

    >>> learner = MetaSGD(net(), "classification", AlgoConfig(inner_steps=2))
    >>> with torch.no_grad():
    ...     _ = learner.alphas["2.weight"].mul_(3.0)
    >>> path = tempfile.mkdtemp() + "/learner.pt"
    >>> mrml.save_learner(learner, path)
    >>> loaded = mrml.load_learner(path, net())
    >>> type(loaded).__name__, torch.equal(loaded.alphas["2.weight"], learner.alphas["2.weight"].detach())
    ('MetaSGD', True)
    >>> torch.equal(loaded.adapt(ep), learner.adapt(ep))
    True

A ``mrml train`` run folder loads with ``load_run`` (model, learner and its state, settings):

    >>> import io
    >>> from mrml.config import RunConfig
    >>> from mrml.train import train
    >>> out = tempfile.mkdtemp()
    >>> _ = train(RunConfig.resolve({"dataset": "sinusoid", "algo": "metasgd", "ways": 1, "iterations": 1, "width": 8,
    ...     "meta_batch": 1, "inner_steps": 1, "val_episodes": 1, "test_episodes": 2, "device": "cpu", "out": out}),
    ...     progress=False, stream=io.StringIO())
    >>> run = mrml.load_run(out)
    >>> type(run.learner).__name__, sorted(run.learner.alphas) == sorted(n for n, _ in run.model.named_parameters())
    ('MetaSGD', True)
"""
