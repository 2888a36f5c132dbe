"""Which gradient each way of forming the reverse-KL term follows: the one table that the
config check (what training accepts), the default of ``kl.is_correction`` (``auto``) and the
audit's rows all read, so that the three cannot disagree.

A form is where the term sits (``placement``), the estimator of its value, ``kl.gradient``
and ``kl.is_correction`` (the ratio π/π_old with its gradient, loss only). Its entry is the
target whose gradient the term's expected gradient equals on-policy, or None where it
follows none. Every entry is a measurement of ``python -m klsweep.audit task=exact
audit.refused=true`` (rel_bias 0 to float rounding against the entry's target, and far from
every target for None); tests/test_audit.py holds the table to it on a small exact task.
``kl.unit`` scales a term and not its direction, so the table has no unit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

REVERSE_KL = "reverse_kl"
MYOPIC = "reverse_kl_myopic"
FORWARD_KL = "forward_kl"
TARGETS = (REVERSE_KL, MYOPIC, FORWARD_KL)
# what the KL penalty is meant to follow: the sequence's reverse KL, or, for a per-token
# term, the most it can follow (each position's reverse KL, the prefixes held)
REVERSE_TARGETS = (REVERSE_KL, MYOPIC)
AUTO = "auto"


@dataclass(frozen=True)
class Form:
    """One way training forms the reverse-KL term."""

    placement: str
    estimator: str
    gradient: str = "estimator"
    is_correction: bool = False

    def describe(self) -> str:
        """The settings that make this form, as typed on the command line."""
        parts = [f"kl.estimator={self.estimator}"]
        if self.gradient != "estimator":
            parts.append(f"kl.gradient={self.gradient}")
        parts.append(f"kl.is_correction={str(self.is_correction).lower()}")
        return " ".join(parts) + f" in the {self.placement}"


def _loss(estimator: str, gradient: str = "estimator", correction: bool = False) -> Form:
    return Form("loss", estimator, gradient, correction)


# On-policy, E ĝ equals ∇ of the entry's target (l = log π − log π_ref, ρ = π/π_old):
FOLLOWS: dict[Form, str | None] = {
    # in the reward the penalty is a detached number, so kl.gradient and kl.is_correction act
    # on nothing; only k1's expectation is the KL, so only its score-function gradient is the
    # sequence KL's (Tang & Munos 2025)
    Form("reward", "k1"): REVERSE_KL,
    Form("reward", "k2"): None,
    Form("reward", "k3"): None,
    Form("reward", "abs"): None,
    Form("reward", "full"): None,
    # k1: E ∇l = E ∇log π = 0; ρ·l adds l·∇log π, each position's reverse-KL gradient
    _loss("k1"): None,
    _loss("k1", correction=True): MYOPIC,
    # k2: ∇(l²/2) = l·∇log π already; ρ·k2 adds (l²/2)·∇log π, which follows no KL
    _loss("k2"): MYOPIC,
    _loss("k2", correction=True): None,
    # k3: ∇k3 = (1 − π_ref/π)·∇log π, each position's forward KL; ρ·k3 adds k3·∇log π, which
    # sums to l·∇log π (TRL's use_bias_correction_kl, DeepSeek-V3.2)
    _loss("k3"): FORWARD_KL,
    _loss("k3", correction=True): MYOPIC,
    # abs: sign(l)·∇log π, and (|l| + sign(l))·∇log π with ρ: neither is a KL's gradient
    _loss("abs"): None,
    _loss("abs", correction=True): None,
    # full: the exact KL at each position, a function of the prefix only, so ρ's added term
    # full_t·∇log π(y_t) has expectation 0: the same target, with more variance
    _loss("full"): MYOPIC,
    _loss("full", correction=True): MYOPIC,
    # kl.gradient=k2 (verl's k3+): any value, k2's gradient l·∇log π ...
    **{_loss(e, "k2"): MYOPIC for e in ("k1", "k2", "k3", "abs", "full")},
    # ... and ρ on top adds value·∇log π: twice the target for k1, no KL's for k2, k3, abs;
    # for full again expectation 0
    **{_loss(e, "k2", True): None for e in ("k1", "k2", "k3", "abs")},
    _loss("full", "k2", True): MYOPIC,
}


def follows(form: Form) -> str | None:
    """The target whose gradient ``form`` follows on-policy (None: no KL's)."""
    if form.placement == "reward":  # the knobs of a loss term act on nothing here
        form = Form("reward", form.estimator)
    return FOLLOWS[form]


def breaking_correction(form: Form) -> str | None:
    """Why training refuses ``form``, or None: the correction is refused where it turns a term
    that follows a reverse-KL gradient into one that follows none (k2 in the loss, and any
    ``kl.gradient=k2`` but on ``full``: two corrections of one term)."""
    if form.placement != "loss" or not form.is_correction:
        return None
    without = follows(replace(form, is_correction=False))
    if without in REVERSE_TARGETS and follows(form) is None:
        return (f"{form.describe()} follows no KL's gradient (without the correction it "
                f"follows {without}: the audit's table, klsweep.kl.forms); type "
                f"kl.is_correction=false, or auto for the audit's choice")
    return None


def default_correction(placement: str, estimator: str, gradient: str) -> bool:
    """``kl.is_correction=auto``: the correction where it makes the loss term follow a
    reverse-KL gradient that the term without it does not (k1, k3); off where the term already
    follows one (k2, full, ``kl.gradient=k2``), where neither form does (abs, which verl
    offers uncorrected) and outside the loss (where it acts on nothing)."""
    if placement != "loss":
        return False
    corrected = follows(Form(placement, estimator, gradient, True))
    plain = follows(Form(placement, estimator, gradient, False))
    return corrected in REVERSE_TARGETS and plain not in REVERSE_TARGETS


def accepted_forms() -> list[Form]:
    """Every form training accepts: the audit's rows."""
    return [form for form in FOLLOWS if breaking_correction(form) is None]
