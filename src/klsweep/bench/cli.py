"""``python -m klsweep.bench``: the speed of one training step, end to end, against this
machine's limit.

Runs the real training loop (Lightning, the module, sampling with the KV cache, the reference
pass, the update, logging) on the shape of DESIGN §11: a GPT-2-shaped policy of 2 layers ×
128 wide, 4 heads, vocabulary 32, prompts of 8 tokens, 16 new tokens; GRPO 8 prompts × 8
completions, PPO 16 × 4, DPO 32 pairs a step. Warm-up steps are not counted.

The limit: one warm-up step runs under ``FlopCounterMode``, which sees every matrix product
(the linear layers forward and backward, attention) and the phase it ran in; each distinct
shape is then timed alone, with the run's thread count. Their sum is the step's roofline: the
time it would take doing nothing but its matrix products at this machine's measured rate on
the model's own shapes. The fraction reached is that time over the measured step.

``--shares [overrides]`` measures a whole run instead (the real command's, e.g.
``task=reasoning``): the share of its wall time spent training the reference on first use,
in the task's evaluations, and in the rest (``--warm``: with the reference cached).
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

from klsweep.bench.printing import report
from klsweep.bench.run import MAX_NEW_TOKENS, PRESETS, PROMPT_LEN, measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m klsweep.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algo", default="grpo", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=30, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before them (>= 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, a run's default: conf threads)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="N more steps under torch.profiler: time by kind of kernel")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--prompt-len", type=int, default=PROMPT_LEN)
    parser.add_argument("--new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--lag", type=int, nargs="+", metavar="K",
                        help="compare rollout.lag values, each measured in its own process "
                             "(0: the synchronous loop; see klsweep.bench.lag)")
    parser.add_argument("--rounds", type=int, default=3, help="--lag: measurements of each")
    parser.add_argument("--sync-threads", type=int, metavar="N",
                        help="--lag: the synchronous loop on N threads too")
    parser.add_argument("--no-roofline", dest="roofline", action="store_false",
                        help="count no FLOPs and time no roofline")
    parser.add_argument("--shares", action="store_true",
                        help="time a whole run of the overrides' config: reference training, "
                             "evaluation, the rest (klsweep.bench.shares)")
    parser.add_argument("--warm", action="store_true",
                        help="with --shares: the reference from the configured cache")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. algo.group_size=16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.lag:
        from klsweep.bench.lag import compare, table

        child = ["--algo", args.algo, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                 *args.overrides]
        result = compare(args.lag, rounds=args.rounds, threads=args.threads,
                         sync_threads=args.sync_threads, args=child)
        print(json.dumps(result) if args.json else table(result))
        return
    if args.shares:
        from klsweep.bench.shares import measure_shares, shares_report

        result = measure_shares(args.overrides, args.warm)
        print(json.dumps(result) if args.json else shares_report(result))
        return
    result = measure(args.algo, args.steps, args.warmup, args.threads, args.overrides,
                     args.profile, counted=args.roofline, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens)
    print(json.dumps(result) if args.json else report(result))
