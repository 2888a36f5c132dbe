"""``python -m klsweep.bench``: the speed of one training step against this machine's limit.

Read in the order the benchmark works: ``timing`` (where the wall time goes, phase by
phase), ``flops`` (what a step computes: every matrix product and its shape), ``roofline``
(the machine's rate on those shapes), ``run`` (train on the benchmark shape and gather the
JSON record), ``printing`` (the human summary) and ``cli`` (the command line).
"""
