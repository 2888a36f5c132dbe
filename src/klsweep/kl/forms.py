"""Which gradient each way of forming the reverse-KL term follows, on-policy and off-policy:
the one table that the config check (what training accepts), the default of
``kl.is_correction`` (``auto``) and the audit's rows all read, so that the three cannot
disagree.

A form is where the term sits (``placement``), the estimator of its value, ``kl.gradient``
and ``kl.is_correction`` (loss only): ``true``, the token's ratio ρ_t = π/π_old with its
gradient; ``sequence``, ρ_t times the ratio of the prefix before it, Π_{s<t} ρ_s (detached),
so that the product is the sequence's ratio up to t. Its entry says which target the term's
expected gradient equals on-policy (samples from π) and off-policy (samples from a π_old
that is some optimiser steps behind: ``rollout.lag`` > 0, the audit's ``audit.staleness``),
or None where it follows none. Every entry is a measurement of ``python -m klsweep.audit
task=exact audit.refused=true [audit.staleness=K]`` (rel_bias 0 to float rounding against the
entry's target, and far from every target for None); tests/test_audit.py holds the table to
it on a small exact task. ``kl.unit`` scales a term and not its direction, so the table has
no unit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

REVERSE_KL = "reverse_kl"
MYOPIC = "reverse_kl_myopic"
FORWARD_KL = "forward_kl"
TARGETS = (REVERSE_KL, MYOPIC, FORWARD_KL)
# what the KL penalty is meant to follow: the sequence's reverse KL, or, for a per-token
# term, the most it can follow (each position's reverse KL, the prefixes held)
REVERSE_TARGETS = (REVERSE_KL, MYOPIC)
AUTO = "auto"
SEQUENCE = "sequence"
# kl.is_correction: off, the token's ratio (true), the sequence's ratio up to the token
CORRECTIONS = (False, True, SEQUENCE)


@dataclass(frozen=True)
class Form:
    """One way training forms the reverse-KL term."""

    placement: str
    estimator: str
    gradient: str = "estimator"
    is_correction: bool | str = False

    def describe(self) -> str:
        """The settings that make this form, as typed on the command line."""
        parts = [f"kl.estimator={self.estimator}"]
        if self.gradient != "estimator":
            parts.append(f"kl.gradient={self.gradient}")
        if self.placement == "loss":
            parts.append(f"kl.is_correction={spelled(self.is_correction)}")
        return " ".join(parts) + f" in the {self.placement}"


def spelled(is_correction: bool | str) -> str:
    """``kl.is_correction`` as typed on the command line (true, false, sequence): one type for
    a column that holds all three, as a W&B table needs."""
    return str(is_correction).lower() if isinstance(is_correction, bool) else is_correction


class Follows(NamedTuple):
    """The target a form's expected gradient equals: with samples from π, and with samples
    from a π_old some optimiser steps behind (None: no KL's)."""

    on_policy: str | None
    off_policy: str | None


def _loss(estimator: str, gradient: str = "estimator",
          correction: bool | str = False) -> Form:
    return Form("loss", estimator, gradient, correction)


NONE = Follows(None, None)
# on-policy the sequence's ratio is 1 with the token's gradient, as the token's ratio is; off
# it reweights each position's prefix from π_old's to π's, and only it keeps a target
TOKEN_ONLY = Follows(MYOPIC, None)
BOTH = Follows(MYOPIC, MYOPIC)

# E ĝ equals ∇ of the entry's target (l = log π − log π_ref, ρ_t = π/π_old at token t):
FOLLOWS: dict[Form, Follows] = {
    # in the reward the penalty is a detached number, so kl.gradient and kl.is_correction act
    # on nothing; only k1's expectation is the KL, so only its score-function gradient is the
    # sequence KL's (Tang & Munos 2025). Off-policy the surrogate's per-token ratio reweights
    # each token's score, not the sequence's probability: none is left (k1: rel_bias 0.26)
    Form("reward", "k1"): Follows(REVERSE_KL, None),
    **{Form("reward", e): NONE for e in ("k2", "k3", "abs", "full")},
    # k1: E ∇l = E ∇log π = 0; ρ·l adds l·∇log π, each position's reverse-KL gradient
    _loss("k1"): NONE,
    _loss("k1", correction=True): TOKEN_ONLY,
    _loss("k1", correction=SEQUENCE): BOTH,
    # k2: ∇(l²/2) = l·∇log π already, but off-policy under π_old's tokens; ρ·k2 adds
    # (l²/2)·∇log π, which follows no KL, with either ratio
    _loss("k2"): Follows(MYOPIC, None),
    _loss("k2", correction=True): NONE,
    _loss("k2", correction=SEQUENCE): NONE,
    # k3: ∇k3 = (1 − π_ref/π)·∇log π, each position's forward KL; ρ·k3 adds k3·∇log π, which
    # sums to l·∇log π (TRL's use_bias_correction_kl, DeepSeek-V3.2). Off-policy the token's
    # ratio leaves the prefixes at π_old's distribution (the audit's 0.020 at staleness 4);
    # the sequence's ratio up to t moves them to π's
    _loss("k3"): Follows(FORWARD_KL, None),
    _loss("k3", correction=True): TOKEN_ONLY,
    _loss("k3", correction=SEQUENCE): BOTH,
    # abs: sign(l)·∇log π, and (|l| + sign(l))·∇log π with ρ: neither is a KL's gradient
    **{_loss("abs", correction=c): NONE for c in CORRECTIONS},
    # full: the exact KL at each position, a function of the prefix only, so ρ's added term
    # full_t·∇log π(y_t) has expectation 0: the same target, with more variance; off-policy
    # only the prefix's ratio keeps it
    _loss("full"): TOKEN_ONLY,
    _loss("full", correction=True): TOKEN_ONLY,
    _loss("full", correction=SEQUENCE): BOTH,
    # kl.gradient=k2 (verl's k3+): any value, k2's gradient l·∇log π ...
    **{_loss(e, "k2"): TOKEN_ONLY for e in ("k1", "k2", "k3", "abs", "full")},
    # ... and ρ on top adds value·∇log π: twice the target for k1, no KL's for k2, k3, abs;
    # for full again expectation 0
    **{_loss(e, "k2", c): NONE for e in ("k1", "k2", "k3", "abs") for c in (True, SEQUENCE)},
    _loss("full", "k2", True): TOKEN_ONLY,
    _loss("full", "k2", SEQUENCE): BOTH,
}


def _key(form: Form) -> Form:
    if form.placement == "reward":  # the knobs of a loss term act on nothing here
        return Form("reward", form.estimator)
    return form


def follows(form: Form, off_policy: bool = False) -> str | None:
    """The target whose gradient ``form`` follows (None: no KL's), on-policy or with samples
    from a stale π_old."""
    entry = FOLLOWS[_key(form)]
    return entry.off_policy if off_policy else entry.on_policy


def breaking_correction(form: Form) -> str | None:
    """Why training refuses ``form`` on-policy, or None: a correction is refused where it
    turns a term that follows a reverse-KL gradient into one that follows none (k2 in the
    loss, and any ``kl.gradient=k2`` but on ``full``: two corrections of one term)."""
    if form.placement != "loss" or not form.is_correction:
        return None
    without = follows(replace(form, is_correction=False))
    if without in REVERSE_TARGETS and follows(form) is None:
        return (f"{form.describe()} follows no KL's gradient (without the correction it "
                f"follows {without}: the audit's table, klsweep.kl.forms); type "
                f"kl.is_correction=false, or auto for the audit's choice")
    return None


def off_policy_correction(placement: str, estimator: str, gradient: str) -> bool | str:
    """The correction that makes a loss term follow a reverse-KL gradient off-policy (the
    sequence's ratio for k1, k3, full), or False where none does."""
    if placement == "loss" and follows(Form(placement, estimator, gradient, SEQUENCE),
                                       True) in REVERSE_TARGETS:
        return SEQUENCE
    return False


def stale_refusal(form: Form, lag: int) -> str | None:
    """Why training at ``rollout.lag`` = ``lag`` > 0 refuses ``form``, or None: off-policy it
    accepts only the forms whose off-policy entry is a reverse-KL target."""
    if form.placement == "none" or follows(form, True) in REVERSE_TARGETS:
        return None
    head = (f"{form.describe()} follows no KL's gradient off-policy (rollout.lag={lag}: the "
            f"audit's table, klsweep.kl.forms)")
    if off_policy_correction(form.placement, form.estimator, form.gradient):
        return f"{head}; type kl.is_correction={SEQUENCE}, or auto for the audit's choice"
    movable = [e for e, f in ((f.estimator, f) for f in FOLLOWS)
               if f.placement == "loss" and f.gradient == "estimator"
               and f.is_correction == SEQUENCE and follows(f, True) in REVERSE_TARGETS]
    where = ("kl.placement=loss with " if form.placement == "reward" else "")
    return (f"{head}; at rollout.lag > 0 type {where}kl.estimator={' | '.join(movable)} "
            f"(auto corrects it by the sequence's ratio), or kl.placement=none")


def default_correction(placement: str, estimator: str, gradient: str,
                       off_policy: bool = False) -> bool | str:
    """``kl.is_correction=auto``. On-policy: the token's ratio where it makes the loss term
    follow a reverse-KL gradient that the term without it does not (k1, k3); off where the
    term already follows one (k2, full, ``kl.gradient=k2``), where neither form does (abs,
    which verl offers uncorrected) and outside the loss (where it acts on nothing).
    Off-policy (``rollout.lag`` > 0): the sequence's ratio where it keeps the term on a
    reverse-KL gradient (k1, k3, full), else off (training then refuses the form)."""
    if placement != "loss":
        return False
    if off_policy:
        return off_policy_correction(placement, estimator, gradient)
    corrected = follows(Form(placement, estimator, gradient, True))
    plain = follows(Form(placement, estimator, gradient, False))
    return corrected in REVERSE_TARGETS and plain not in REVERSE_TARGETS


def accepted_forms(off_policy: bool = False) -> list[Form]:
    """Every form training accepts, on-policy or at ``rollout.lag`` > 0: the audit's rows."""
    return [form for form in FOLLOWS if breaking_correction(form) is None
            and (not off_policy or stale_refusal(form, 1) is None)]
