"""The tiny GPT's KV cache, and batched sampling."""

from dataclasses import replace

import pytest
import torch

from klsweep.config import choice_config
from klsweep.models.tiny import TinyGPT
from klsweep.rollout import Prompts, completion_logits, generate, token_logprobs


def _model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(choice_config("model", "tiny", n_layer=2, n_head=4, n_embd=32),
                   vocab_size=11, block_size=16).eval()


def test_cached_decoding_equals_uncached_decoding():
    model = _model()
    tokens = torch.randint(0, 11, (3, 12))
    full = model(tokens)
    cache = model.new_cache(3, 12)
    steps = [model(tokens[:, :5], cache=cache)]  # prefill, then one token at a time
    steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_shared_prefill_equals_one_prefill_per_row():
    model = _model(1)
    prompts = torch.randint(0, 11, (2, 4))
    cache = model.new_cache(2, 4)  # room for the prompt: the shared copy gets room for more
    model(prompts, cache=cache)
    shared = cache.repeat_interleave(3, 6)
    next_tokens = torch.randint(0, 11, (6, 1))
    got = model(next_tokens, cache=shared)
    want = model(torch.cat([prompts.repeat_interleave(3, 0), next_tokens], 1))[:, -1:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_masks_after_eos_and_logs_the_sampling_logprobs():
    model = _model(2)
    torch.manual_seed(3)
    prompts = torch.randint(0, 10, (4, 3))
    rollout = generate(model, Prompts.unpadded(prompts), n_per_prompt=5, max_new_tokens=10,
                       eos_id=10, temperature=0.7)
    assert rollout.tokens.shape[0] == 20
    completions, mask = rollout.completions, rollout.mask
    for row, keep in zip(completions.tolist(), mask.tolist(), strict=True):
        n = sum(keep)
        assert keep == [True] * n + [False] * (len(keep) - n)  # a prefix is kept
        if 10 in row[:n]:
            assert row.index(10) == n - 1                     # ... up to and including EOS
        assert all(t == 10 for t in row[n:])                  # the rest is padding
    # rows are grouped by prompt
    assert torch.equal(rollout.tokens[:5, :3], prompts[0].expand(5, 3))
    logits = completion_logits(model, replace(rollout, group_size=1), temperature=0.7)
    logp = token_logprobs(logits, completions)
    torch.testing.assert_close(rollout.old_logp, logp * mask, rtol=1e-4, atol=1e-5)


def test_grouped_completion_logits_equal_one_pass_per_row():
    model = _model(4).train()  # with gradient, as in the policy update
    torch.manual_seed(5)
    prompts = torch.randint(0, 10, (3, 4))
    rollout = generate(model, Prompts.unpadded(prompts), n_per_prompt=4, max_new_tokens=6,
                       eos_id=10)
    grouped = completion_logits(model, rollout)
    plain = completion_logits(model, replace(rollout, group_size=1))
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-5)
    # the gradient through the shared prompt sums over its group
    weights = torch.randn_like(plain)
    grad_grouped = torch.autograd.grad((grouped * weights).sum(), model.wte.weight)[0]
    grad_plain = torch.autograd.grad((plain * weights).sum(), model.wte.weight)[0]
    torch.testing.assert_close(grad_grouped, grad_plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 4])
def test_one_pass_gives_the_logits_and_the_hidden_states_of_two(group_size):
    """PPO's critic reads the hidden states of the pass that scored the rollout: its logits
    are completion_logits' to the bit, and its states are those of a second pass through the
    trunk, to the bit where that pass is the same one (no shared prompt), and the head turns
    them into the logits."""
    model = _model(6)
    torch.manual_seed(6)
    prompts = torch.randint(0, 11, (3, 4))
    rollout = generate(model, Prompts.unpadded(prompts), n_per_prompt=4, max_new_tokens=6,
                       eos_id=10)
    tokens, P = rollout.tokens, rollout.prompt_len
    with torch.no_grad():
        logits, hidden = model.completion_logits_and_hidden(tokens, None, P, group_size)
        assert torch.equal(logits, model.completion_logits(tokens, None, P, group_size))
        second = model.hidden_states(tokens[:, :-1])[:, P - 1:]
    assert hidden.shape == (12, 6, model.hidden_size)
    if group_size == 1:
        assert torch.equal(hidden, second)
    torch.testing.assert_close(hidden, second, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head(hidden), logits)
