"""The loss-placed KL term of the policy pair: its gradient, by hand."""

import math

import pytest
import torch

from klsweep.config import compose_and_validate
from klsweep.policy import KLConfig, PolicyPair
from klsweep.schema import from_node


def _pair(**kl: str) -> PolicyPair:
    cfg = compose_and_validate({"kl.estimator": "k3", **kl})
    # kl_loss_term touches neither model
    return PolicyPair(None, None, from_node(KLConfig, cfg.kl), temperature=1.0,
                      max_new_tokens=1, eos_id=0)


@pytest.mark.parametrize("l", [-1.5, -0.2, 0.3, 2.0])
def test_is_correction_turns_k3_s_forward_kl_gradient_into_the_reverse_kl_one(l):
    """On-policy (π_old = π), with l = log π − log π_ref:
    plain k3 = e^(−l) − 1 + l has ∂/∂log π = 1 − e^(−l), the forward-KL direction;
    ρ·k3 with ρ = π/π_old carrying its gradient has ∂/∂log π = k3 + 1 − e^(−l) = l, whose
    expectation under π is ∇KL(π‖π_ref), the reverse KL; its value is k3 either way."""
    ref_logp = torch.tensor([-1.0])
    for correction, want_grad in ((False, 1.0 - math.exp(-l)), (True, l)):
        logp = (ref_logp + l).requires_grad_(True)
        pair = _pair(**{"kl.is_correction": str(correction).lower()})
        term = pair.kl_loss_term(logp, ref_logp, None, None, old_logp=logp.detach())
        (grad,) = torch.autograd.grad(term.sum(), logp)
        assert float(term.detach()) == pytest.approx(math.exp(-l) - 1.0 + l, rel=1e-6)
        assert float(grad) == pytest.approx(want_grad, rel=1e-5, abs=1e-7)


def test_is_correction_off_policy_weighs_the_value_by_the_ratio():
    logp, old_logp, ref_logp = torch.tensor([-0.5]), torch.tensor([-0.9]), torch.tensor([-1.2])
    term = _pair(**{"kl.is_correction": "true"}).kl_loss_term(logp, ref_logp, None, None,
                                                               old_logp)
    l = 0.7
    assert float(term) == pytest.approx(math.exp(0.4) * (math.exp(-l) - 1 + l), rel=1e-6)
