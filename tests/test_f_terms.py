"""Each f-divergence's reward penalty and loss term, proved by enumeration: on a tabular
policy over a small tree of completions (V tokens, L positions; L = 1 is one categorical),
the expected gradient of what training forms, over every completion weighed by its
probability, equals autograd of the exact divergence, sequence or token unit."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from klsweep.kl.divergences import DIVERGENCES, make_divergence

ALL = [make_divergence(name, 0.4 if name == "alpha" else None) for name in DIVERGENCES]
# the f-divergences beyond the KL, whose penalty and loss term are f′'s; the KL keeps its
# estimators (DESIGN §4), checked at the end
F_FAMILY = [div for div in ALL if div.name != "reverse_kl"]
TREES = [(4, 1), (3, 2)]  # (V, L)
CASES = [("sequence", "k1"), ("token", "k1"), ("token", "full")]


class Tree:
    """Every completion of a tabular policy (one logit vector per prefix) and reference."""

    def __init__(self, vocab, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.V, self.L = vocab, length
        self.y = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        self.prefixes = {p: i for i, p in enumerate(
            p for t in range(length) for p in itertools.product(range(vocab), repeat=t))}
        n = len(self.prefixes)
        self.z = (0.7 * torch.randn(n, vocab, generator=g, dtype=torch.float64)).requires_grad_()
        self.ref_z = torch.randn(n, vocab, generator=g, dtype=torch.float64)
        self.index = torch.tensor([[self.prefixes[tuple(row[:t].tolist())]
                                    for t in range(length)] for row in self.y])
        self.mask = torch.ones(len(self.y), length, dtype=torch.bool)

    def scored(self):
        """logits [B, L, V] and log-probs [B, L] of every completion, policy and reference."""
        logits, ref_logits = self.z[self.index], self.ref_z[self.index]
        take = self.y[..., None]
        logp = torch.log_softmax(logits, -1).gather(-1, take).squeeze(-1)
        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, take).squeeze(-1)
        return logits, ref_logits, logp, ref_logp

    def exact(self, div, unit):
        """D of the policy, differentiable: over whole completions, or per position weighed
        by the policy's probability of each prefix."""
        _, _, logp, ref_logp = self.scored()
        if unit == "sequence":
            seq, ref_seq = logp.sum(1), ref_logp.sum(1)
            return (ref_seq.exp() * div.f(seq - ref_seq)).sum()
        p, q = torch.log_softmax(self.z, -1), torch.log_softmax(self.ref_z, -1)
        per_prefix = (q.exp() * div.f(p - q)).sum(-1)
        total = 0.0
        for prefix, i in self.prefixes.items():
            reach = sum((p[self.prefixes[prefix[:t]], a] for t, a in enumerate(prefix)),
                        torch.zeros((), dtype=torch.float64))
            total = total + reach.exp() * per_prefix[i]
        return total


def _grad(tree, value):
    return torch.autograd.grad(value, tree.z, retain_graph=True)[0]


def _settings(unit, estimator):
    return SimpleNamespace(unit=unit, estimator=estimator, clamp=20.0, gradient="estimator",
                           is_correction=False)


@pytest.mark.parametrize("tree_shape", TREES)
@pytest.mark.parametrize("unit,estimator", CASES)
@pytest.mark.parametrize("div", F_FAMILY, ids=repr)
def test_reward_penalty_score_function_gradient_is_the_divergence_gradient(
        div, unit, estimator, tree_shape):
    tree = Tree(*tree_shape)
    want = _grad(tree, tree.exact(div, unit))
    logits, ref_logits, logp, ref_logp = tree.scored()
    kl = _settings(unit, estimator)
    penalty = div.reward_penalty(logp.detach(), ref_logp, tree.mask, kl, logits.detach(),
                                 ref_logits)
    weight = logp.sum(1).exp().detach()
    # GRPO: the sequence's summed penalty weighs its whole score
    grpo = (weight * penalty.sum(1) * logp.sum(1)).sum()
    torch.testing.assert_close(_grad(tree, grpo), want, rtol=1e-9, atol=1e-12)
    # PPO (γ = 1): each token's score weighed by the penalty from that token on
    to_go = penalty.flip(1).cumsum(1).flip(1)
    ppo = (weight[:, None] * to_go * logp).sum()
    torch.testing.assert_close(_grad(tree, ppo), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tree_shape", TREES)
@pytest.mark.parametrize("unit,estimator", CASES)
@pytest.mark.parametrize("div", F_FAMILY, ids=repr)
def test_loss_term_expected_gradient_on_policy_is_the_divergence_gradient(
        div, unit, estimator, tree_shape):
    tree = Tree(*tree_shape)
    exact = tree.exact(div, unit)
    want = _grad(tree, exact)
    logits, ref_logits, logp, ref_logp = tree.scored()
    term = div.loss_term(logp, ref_logp, logp.detach(), tree.mask, _settings(unit, estimator),
                         logits, ref_logits)
    weight = logp.sum(1).exp().detach()
    torch.testing.assert_close(_grad(tree, (weight * term.sum(1)).sum()), want,
                               rtol=1e-9, atol=1e-12)
    # and its value is the divergence's estimate: its mean is D
    assert float((weight * term.detach().sum(1)).sum()) == pytest.approx(float(exact.detach()),
                                                                         rel=1e-9)


@pytest.mark.parametrize("unit,estimator", [("sequence", "k1"), ("sequence", "k3"),
                                            ("token", "k1"), ("token", "k3"),
                                            ("token", "full")])
@pytest.mark.parametrize("div", ALL, ids=repr)
def test_value_estimates_average_to_the_divergence_and_k3_is_non_negative(div, unit, estimator):
    tree = Tree(3, 2, seed=1)
    logits, ref_logits, logp, ref_logp = tree.scored()
    values = div.values(logp.detach(), ref_logp, tree.mask, _settings(unit, estimator),
                        logits.detach(), ref_logits)
    weight = logp.sum(1).exp().detach()
    # the KL's full estimator is full_kl, in float32 as before (golden replays)
    rel = 1e-6 if (div.name, estimator) == ("reverse_kl", "full") else 1e-9
    assert float((weight * values.sum(1)).sum()) == pytest.approx(
        float(tree.exact(div, unit).detach()), rel=rel)
    if estimator == "k3":
        assert values.min() >= -1e-12


def test_for_the_kl_the_interface_is_the_estimators_of_before():
    from klsweep.kl import kl_penalty_per_token, kl_per_token

    tree = Tree(3, 2)
    logits, ref_logits, logp, ref_logp = tree.scored()
    kl = make_divergence("reverse_kl")
    for estimator in ("k1", "k2", "k3", "abs", "full"):
        s = _settings("token", estimator)
        torch.testing.assert_close(
            kl.reward_penalty(logp, ref_logp, tree.mask, s, logits, ref_logits),
            kl_per_token(logp, ref_logp, estimator, logits=logits, ref_logits=ref_logits))
        torch.testing.assert_close(
            kl.loss_term(logp, ref_logp, logp.detach(), tree.mask, s, logits, ref_logits),
            kl_penalty_per_token(logp, ref_logp, estimator, logits=logits,
                                 ref_logits=ref_logits))


@pytest.mark.parametrize("tree_shape", TREES)
def test_for_the_kl_k1_in_the_reward_is_the_kl_gradient(tree_shape):
    tree = Tree(*tree_shape)
    kl = make_divergence("reverse_kl")
    want = _grad(tree, tree.exact(kl, "sequence"))
    torch.testing.assert_close(want, _grad(tree, tree.exact(kl, "token")))  # the chain rule
    logits, ref_logits, logp, ref_logp = tree.scored()
    penalty = kl.reward_penalty(logp.detach(), ref_logp, tree.mask, _settings("token", "k1"))
    weight = logp.sum(1).exp().detach()
    torch.testing.assert_close(_grad(tree, (weight * penalty.sum(1) * logp.sum(1)).sum()), want,
                               rtol=1e-9, atol=1e-12)
