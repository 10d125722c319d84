"""Trunks as users call them (`trunk=`): an encoder called with keyword or positional arguments taken
from the input (`self.encoder(**batch)`, `self.encoder(ids, mask)`), returning an output object
(a dataclass such as a Hugging Face ModelOutput), a dict or a tuple, then attention-mask pooling of
the input in the model's forward and a linear head. The trunk runs twice per task (any K), per task
and task-batched, with the hypergradient of the general path (the whole network re-run in the inner
loop, `recompute_features`) in float64; an encoder fed from the inner parameters is one line. With
`transformers` installed, the same with a tiny random-init BertModel."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from mrml import MRML, AlgoConfig
from mrml.errors import UsageError
from test_library_api import WAYS, count_calls, mean_eval, meta_train, text_episode

#: the exact settings both paths run when hypergradients are compared (converged solves)
EXACT = dict(inner_solver="newton", implicit="cg", learn_l2=True, inner_steps=50, inner_tol=1e-13, cg_steps=200,
             cg_tol=1e-14, l2=0.3)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None


class TinyEncoder(nn.Module):
    """HF-shaped: keyword arguments input_ids / attention_mask, an output object (or a dict / tuple)."""

    def __init__(self, vocab: int = 40, dim: int = 8, returns: str = "dataclass"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.returns = returns

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        context = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)  # one masked "attention" step
        h = self.norm(h + torch.tanh(self.mix(h + context)))
        if self.returns == "dict":
            return {"last_hidden_state": h, "lengths": attention_mask.sum(1)}
        if self.returns == "tuple":
            return (h, None)
        return EncoderOutput(last_hidden_state=h)


def mask_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


class KeywordCall(nn.Module):
    """`self.encoder(**batch).last_hidden_state`, mask pooling, then the head (the issue's model)."""

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.encoder = TinyEncoder()
        self.head = nn.Linear(8, WAYS)
        self.scale = scale  # a transform after the head: no closed form, the general split (`Rest`)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.encoder(**batch).last_hidden_state
        out = self.head(mask_pool(h, batch["attention_mask"]))
        return out if self.scale is None else out * self.scale


class PositionalCall(nn.Module):
    """`self.encoder(ids, mask)` returning a dict or a tuple."""

    def __init__(self, returns: str, scale: float | None = None):
        super().__init__()
        self.encoder = TinyEncoder(returns=returns)
        self.head = nn.Linear(8, WAYS)
        self.scale = scale

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(batch["input_ids"], batch["attention_mask"])
        h = out["last_hidden_state"] if isinstance(out, dict) else out[0]
        logits = self.head(mask_pool(h, batch["attention_mask"]))
        return logits if self.scale is None else logits * self.scale


def episodes(count: int, start: int = 0) -> list:
    return [text_episode(start + i).to("cpu", torch.float64) for i in range(count)]


def hypergradient(learner, eps) -> list[torch.Tensor | None]:
    learner.meta_gradient(eps)
    return [None if p.grad is None else p.grad.clone() for p in learner.outer_parameters()]


def general_reference(model: nn.Module, eps, **cfg) -> list[torch.Tensor]:
    """The hypergradient with the whole network re-run in the inner loop (no trunk, no head split)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = MRML(model, "classification", AlgoConfig(inner="head", recompute_features=True, **{**EXACT, **cfg}))
    assert ref.head is None and ref.split.trunk_name is None
    return hypergradient(ref, eps)


def assert_same(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> None:
    assert len(a) == len(b) and sum(x is not None for x in a) > 1
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-8)


# -- the model: keyword call, output object, mask pooling -----------------------------------------
def test_keyword_called_encoder_meta_trains_with_trunk_twice_per_task():
    torch.manual_seed(0)
    model = KeywordCall().double()
    learner = MRML(model, "classification", AlgoConfig(inner="head"), trunk="encoder")
    assert learner.head is not None  # the split at the head's input: the exact default runs
    calls = count_calls(model.encoder)
    train, held = episodes(20), episodes(8, 1000)
    loss0, acc0 = mean_eval(learner, held)
    calls[0] = 0
    learner.meta_gradient(train[:3])
    assert calls[0] == 6
    meta_train(learner, train, steps=20, lr=3e-2)
    loss1, acc1 = mean_eval(learner, held)
    assert loss1 < loss0 - 0.3 and acc1 > max(acc0, 0.9), (loss0, loss1, acc0, acc1)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("solver", ["gd", "newton"])
def test_keyword_called_encoder_runs_twice_per_task_whatever_k(k, solver):
    torch.manual_seed(0)
    model = KeywordCall().double()
    learner = MRML(model, "classification", AlgoConfig(inner="head", inner_solver=solver, inner_steps=k),
                   trunk="encoder")
    calls = count_calls(model.encoder)
    learner.meta_gradient(episodes(2))
    assert calls[0] == 4


@pytest.mark.parametrize("implicit", ["cg", "direct"])
def test_keyword_called_encoder_hypergradient_equals_the_general_path(implicit):
    torch.manual_seed(0)
    model = KeywordCall().double()
    eps = episodes(2)
    mine = MRML(model, "classification", AlgoConfig(inner="head", **{**EXACT, "implicit": implicit}), trunk="encoder")
    got = hypergradient(mine, eps)
    assert mine.log_l2.grad is not None and got[-1].abs() > 0  # lambda's hypergradient compared too
    assert_same(got, general_reference(model, eps))


# -- other call forms and outputs; the general split (a transform after the head) ---------------------------
@pytest.mark.parametrize("make, exact", [
    (lambda: PositionalCall("dict"), True),
    (lambda: PositionalCall("tuple"), True),
    (lambda: KeywordCall(scale=0.5), False),
    (lambda: PositionalCall("dict", scale=0.5), False),
    (lambda: PositionalCall("tuple", scale=0.5), False),
])
def test_call_forms_and_outputs_give_the_general_paths_hypergradient(make, exact):
    torch.manual_seed(0)
    model = make().double()
    eps = episodes(2)
    mine = MRML(model, "classification", AlgoConfig(inner="head", **EXACT), trunk="encoder")
    assert (mine.head is not None) == exact
    calls = count_calls(model.encoder)
    got = hypergradient(mine, eps)
    assert calls[0] == 4
    assert_same(got, general_reference(model, eps))
    assert mine.adapt(eps[0]).shape == (WAYS * 4, WAYS)


def test_general_split_meta_trains_per_task_and_task_batched_alike():
    """A forward reading its input after the trunk, no closed form (gd + CG): the task-batched path
    (task_chunk > 1) runs the trunk per task through the model's forward, with the same hypergradient."""
    torch.manual_seed(0)
    model = KeywordCall(scale=0.5).double()
    eps = episodes(4)
    cfg = dict(inner="head", inner_solver="gd", inner_steps=5, cg_steps=30, cg_tol=1e-14)
    per_task = hypergradient(MRML(model, "classification", AlgoConfig(**cfg), trunk="encoder"), eps)
    batched = MRML(model, "classification", AlgoConfig(task_chunk=2, **cfg), trunk="encoder")
    calls = count_calls(model.encoder)
    assert_same(hypergradient(batched, eps), per_task)
    assert calls[0] == 8


def test_head_split_task_batched_equals_per_task():
    torch.manual_seed(0)
    model = KeywordCall().double()
    eps = episodes(4)
    per_task = hypergradient(MRML(model, "classification", AlgoConfig(inner="head"), trunk="encoder"), eps)
    batched = MRML(model, "classification", AlgoConfig(inner="head", task_chunk=4), trunk="encoder")
    assert batched.head is not None
    calls = count_calls(model.encoder)
    assert_same(hypergradient(batched, eps), per_task)
    assert calls[0] == 8


# -- what cannot work: the trunk's input computed from the inner parameters ---------------------------------
class AdaptedEmbeddings(nn.Module):
    """The encoder fed `inputs_embeds` from an embedding outside it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.encoder = TinyEncoder()
        self.head = nn.Linear(8, WAYS)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.encoder(inputs_embeds=self.embed(batch["input_ids"]),
                         attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(mask_pool(h, batch["attention_mask"])) * 0.5


def test_trunk_input_computed_from_inner_parameters_is_one_line():
    model = AdaptedEmbeddings().double()
    learner = MRML(model, "classification", AlgoConfig(inner="embed,head", inner_solver="gd", inner_steps=2),
                   trunk="encoder")
    with pytest.raises(UsageError, match="computes the trunk 'encoder''s input from the inner parameter "
                                         "'embed.weight'") as err:
        learner.meta_gradient(episodes(1))
    assert "\n" not in str(err.value)
    # an outer embedding before the trunk is fine
    fine = MRML(model, "classification", AlgoConfig(inner="head", **EXACT), trunk="encoder")
    eps = episodes(2)
    assert_same(hypergradient(fine, eps), general_reference(model, eps))


def test_trunk_output_of_an_unknown_type_is_one_line():
    class Odd:
        def __init__(self, h):
            self.last_hidden_state = h

    class OddEncoder(TinyEncoder):
        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            return Odd(super().forward(input_ids, attention_mask).last_hidden_state)

    model = KeywordCall(scale=0.5).double()
    model.encoder = OddEncoder().double()
    learner = MRML(model, "classification", AlgoConfig(inner="head", inner_solver="gd", inner_steps=2),
                   trunk="encoder")
    with pytest.raises(UsageError, match="the trunk returned a Odd: trunk= needs a tensor, or a dataclass"):
        learner.meta_gradient(episodes(1))


# -- a real Hugging Face encoder -----------------------------------------------------------------------------
class BertClassifier(nn.Module):
    def __init__(self, scale: float | None = None):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(8, WAYS)
        self.scale = scale

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.encoder(**batch).last_hidden_state
        out = self.head(mask_pool(h, batch["attention_mask"]))
        return out if self.scale is None else out * self.scale


@pytest.mark.parametrize("scale", [None, 0.5])
def test_transformers_bert_trunk_gives_the_general_paths_hypergradient(scale):
    torch.manual_seed(0)
    model = BertClassifier(scale).double()
    eps = episodes(2)
    mine = MRML(model, "classification", AlgoConfig(inner="head", **EXACT), trunk="encoder")
    assert (mine.head is not None) == (scale is None)
    calls = count_calls(model.encoder)
    got = hypergradient(mine, eps)
    assert calls[0] == 4
    assert_same(got, general_reference(model, eps))


def test_protonet_with_the_general_trunk_split_embeds_with_the_trunks_output(tiny):
    """ProtoNet's embeddings are the trunk's output, also where the rest is not one linear layer."""
    from mrml import ProtoNet
    from test_library_api import CNNWithHidden, image_episodes

    torch.manual_seed(0)
    model = CNNWithHidden().double()
    learner = ProtoNet(model, "classification", trunk="features")
    ep = image_episodes(tiny, 1, dtype=torch.float64)[0]
    stats = learner.meta_gradient([ep])
    assert stats.accuracy is not None and model.features.conv1.weight.grad is not None
    x = ep.query_x.view(-1, 1, 16, 16)
    torch.testing.assert_close(learner.split.embeddings(ep.query_x), model.features(x), rtol=0, atol=0)
