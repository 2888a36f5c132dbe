"""The KL-gradient audit (``python -m klsweep.audit``): what each KL estimator and placement
really optimises. For every way training can form the KL term (estimator × placement ×
kl.gradient × kl.is_correction × kl.unit) it compares the term's expected gradient, as
training's own code forms it, with the gradients of the reverse KL of whole sequences, of the
per-position reverse KL (prefixes held) and of the per-position forward KL: exactly by
enumeration on the exact task, by Monte Carlo with standard errors elsewhere.

Modules: config (the ``audit`` node), gradients (ĝ and the targets as per-sequence functions),
sampling (enumeration and draws), measure (the figures), run (train, go stale, measure),
output (json, markdown, figure, W&B)."""
