"""The benchmark's arithmetic: FLOPs and GEMM shapes as the hand formulas give them, phase
times that never count a second twice, and a JSON record with every field. No timing is
asserted: speed is the benchmark's output, not a test."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from klsweep.bench import cli, engines, flops, roofline, timing
from tests.hf_fixtures import save_tiny_model


def test_one_linear_layer_counts_2mkn_forward_and_twice_that_backward():
    M, C = 40, 16
    layer = nn.Linear(C, 3 * C)
    x = torch.randn(M, C, requires_grad=True)
    counted = flops.PhaseFlops()
    with counted:
        with counted.clock.phase("policy.forward"):
            y = layer(x)
        with counted.clock.phase("policy.backward"):
            y.sum().backward()
    assert counted.flops["policy.forward"] == 2 * M * C * 3 * C
    # the input's gradient [M, 3C]×[3C, C] and the weight's [3C, M]×[M, C]
    assert counted.flops["policy.backward"] == 2 * (2 * M * C * 3 * C)
    assert counted.gemms["policy.forward"] == {(1, M, C, 3 * C): 1}
    assert counted.gemms["policy.backward"] == {(1, M, 3 * C, C): 1, (1, 3 * C, M, C): 1}


def test_cpu_attention_counts_as_torch_formulas_and_its_gemms_sum_to_them():
    q = torch.randn(2, 4, 6, 8, requires_grad=True)
    k = torch.randn(2, 4, 6, 8, requires_grad=True)
    v = torch.randn(2, 4, 6, 8, requires_grad=True)
    counted = flops.PhaseFlops()
    with counted:
        with counted.clock.phase("reference"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        with counted.clock.phase("policy.backward"):
            y.sum().backward()
    shape = (2, 4, 6, 8)
    assert counted.flops["reference"] == sdpa_flop_count(shape, shape, shape)
    assert counted.flops["policy.backward"] == sdpa_backward_flop_count(shape, shape, shape,
                                                                         shape)
    for phase, gemms in counted.gemms.items():
        assert counted.flops[phase] == sum(2 * b * m * k * n * count
                                           for (b, m, k, n), count in gemms.items())


def test_nested_phases_count_each_second_once(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 4.0])  # enter outer, enter inner, leave inner, leave outer
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(now))
    clock = timing.PhaseClock()
    with clock.phase("sampling"):
        assert clock.current == "sampling"
        with clock.phase("reference"):
            assert clock.current == "reference"
    assert clock.current == "other"
    assert clock.take() == {"sampling": 2.0, "reference": 2.0}
    assert clock.take() == {}


def test_the_roofline_times_each_counted_shape_once():
    counted = flops.PhaseFlops()
    counted.flops.update({"policy.forward": 2 * 3 * 8 * 4 * 5})
    counted.gemms["policy.forward"].update({(1, 8, 4, 5): 3})
    roof = roofline.roofline(counted)
    assert roof["policy.forward"]["flops"] == 2 * 3 * 8 * 4 * 5
    assert roof["policy.forward"]["roofline_s"] > 0


SMALL = {"grpo": ["algo.prompts_per_step=2", "algo.group_size=2"],
         "ppo": ["algo.prompts_per_step=2", "algo.samples_per_prompt=2", "algo.ppo_epochs=1"],
         "dpo": ["algo.pairs_per_step=2", "algo.dataset_pairs=8", "algo.eval_prompts=2",
                 "algo.eval_samples_per_prompt=2"]}


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_json_prints_throughput_roofline_memory_and_every_phase(algo, capsys):
    cli.main(["--algo", algo, "--steps", "2", "--warmup", "1", "--threads", "1", "--json",
                *SMALL[algo]])
    record = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_s", "pairs_per_s", "step_ms", "step_ms_median", "peak_memory_mib",
                "gflop_per_step", "roofline_ms", "roofline_fraction", "load_average"):
        assert record[key] >= 0, key
    assert record["steps"] == 2 and record["threads"] == 1
    assert set(record["phases"]) == set(timing.PHASES)
    assert record["gflop_per_step"] > 0 and record["roofline_fraction"] > 0
    assert record["phases"]["sampling"]["gflop"] > 0
    assert record["phases"]["policy.backward"]["gflop"] > 0
    # the phases and "other" add up to the whole loop's step
    total = sum(p["ms"] for p in record["phases"].values())
    assert total == pytest.approx(record["step_ms"])
    if algo == "dpo":
        assert record["pairs_per_s"] > 0


def test_the_human_summary_names_the_rate_the_roofline_and_the_phases(capsys):
    cli.main(["--steps", "1", "--warmup", "1", "--threads", "1", *SMALL["grpo"]])
    out = capsys.readouterr().out
    assert "generated tokens/s" in out and "% of the roofline" in out
    for phase in timing.PHASES:
        assert phase in out


class _Pair:
    def sample(self): return "sampled"
    sample_reference = reference_logprobs = policy_logprobs = sample
    policy_logprobs_and_features = sample


class _Module:
    def __init__(self): self.pair = _Pair()
    def manual_backward(self): return "backward"
    clip_gradients = manual_backward


def test_the_seams_time_the_pair_and_are_gone_after_the_run(monkeypatch):
    now = iter(range(100))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(now)))
    module, clock = _Module(), timing.PhaseClock()
    with timing.timed_phases(module, clock):
        assert module.pair.sample() == "sampled" and module.manual_backward() == "backward"
        assert "sample" in vars(module.pair)
    assert clock.take() == {"sampling": 1.0, "policy.backward": 1.0}
    assert "sample" not in vars(module.pair) and "manual_backward" not in vars(module)


def test_the_engines_alternate_from_round_to_round():
    assert [engines.order(["native", "vllm"], r) for r in range(3)] == [
        ["native", "vllm"], ["vllm", "native"], ["native", "vllm"]]


def test_each_engine_measurement_runs_in_its_own_process_with_the_load_recorded(
        tmp_path, capsys):
    # vLLM binds the OpenMP threads of the process it starts in: each measurement gets a
    # fresh process, whose vllm environment names the cores it may bind
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    assert engines.engine_environment("vllm", 2)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    engines.main([str(model_dir), "--engines", "native", "--rounds", "2", "--threads", "1",
                  "--prompts", "2", "--n", "2", "--tokens", "4", "--repeats", "1"])
    record = json.loads(capsys.readouterr().out)
    runs = record["runs"]["native"]
    assert record["batch"] == "2x2x4" and record["threads"] == 1 and len(runs) == 2
    assert all(r["tokens_per_s"] > 0 and r["load_before"] >= 0 and r["cpu_share"] > 0
               for r in runs)
    # the median of two runs is their mean
    assert record["median_tokens_per_s"]["native"] == pytest.approx(
        (runs[0]["tokens_per_s"] + runs[1]["tokens_per_s"]) / 2)
