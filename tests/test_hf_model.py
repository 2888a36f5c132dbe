"""model=hf: tiny random transformers checkpoints built locally (tests/hf_fixtures.py), loaded
through build_hf as a run loads them, behind klsweep's model interface."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hf_fixtures import save_tiny_model
from omegaconf import OmegaConf

from klsweep.config import CONF_DIR
from klsweep.models.base import padded_positions
from klsweep.models.hf import AdapterDisabled, HFCausalLM, save_adapter
from klsweep.models.hf_build import build_hf, load_tokenizer
from klsweep.models.reference import ReferenceRecipe
from klsweep.rollout import (
    Prompts,
    completion_logits,
    generate,
    token_logprobs,
)

PROMPT_LEN, NEW_TOKENS = 6, 5


@dataclass
class StandInTask:
    """What build_hf reads of a task."""

    name: str = "text"
    vocab_size: int = 300
    prompt_len: int = PROMPT_LEN
    max_new_tokens: int = NEW_TOKENS
    eos_id: int = 1
    recipe: ReferenceRecipe | None = None

    def reference_recipe(self) -> ReferenceRecipe | None:
        return self.recipe


def hf_node(**keys):
    """conf/model/hf.yaml with ``keys`` over it."""
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / "hf.yaml"), keys)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf")
    return {arch: str(save_tiny_model(root / arch, arch, seed=1)) for arch in ("gpt2", "llama")}


def build(name: str, task: StandInTask | None = None, **keys):
    return build_hf(hf_node(name=name, **keys), task or StandInTask())


def padded_batch(generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """3 rows of PROMPT_LEN + NEW_TOKENS tokens whose prompts are left-padded by 0, 2 and 4."""
    g = torch.Generator().manual_seed(generator_seed)
    tokens = torch.randint(2, 300, (3, PROMPT_LEN + NEW_TOKENS), generator=g)
    pads = [0, 2, 4]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    for row, pad in enumerate(pads):
        tokens[row, :pad] = 1  # padding holds EOS, as a pad -> EOS tokenizer writes it
        mask[row, :pad] = False
    return tokens, mask, pads


# --- (a) padding ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_logprobs_equal_each_row_alone(checkpoints, arch):
    policy, _ = build(checkpoints[arch])
    tokens, mask, pads = padded_batch()
    completions = tokens[:, PROMPT_LEN:]
    with torch.no_grad():
        batched = token_logprobs(policy.completion_logits(tokens, mask, PROMPT_LEN), completions)
        for row, pad in enumerate(pads):
            alone = policy.completion_logits(tokens[row:row + 1, pad:], None, PROMPT_LEN - pad)
            torch.testing.assert_close(batched[row:row + 1],
                                       token_logprobs(alone, completions[row:row + 1]),
                                       rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_prompts_give_the_plain_logits_and_gradients(checkpoints, arch):
    policy, _ = build(checkpoints[arch])
    prompts, prompt_mask, _ = padded_batch(1)
    tokens = prompts.repeat_interleave(3, dim=0)
    tokens[:, PROMPT_LEN:] = torch.randint(2, 300, (9, NEW_TOKENS),
                                           generator=torch.Generator().manual_seed(1))
    mask = prompt_mask.repeat_interleave(3, dim=0)

    def logits_and_grads(group_size: int):
        policy.zero_grad()
        logits = policy.completion_logits(tokens, mask, PROMPT_LEN, group_size)
        token_logprobs(logits, tokens[:, PROMPT_LEN:]).sum().backward()
        return logits.detach(), [p.grad.clone() for p in policy.parameters()]

    shared, shared_grads = logits_and_grads(3)
    plain, plain_grads = logits_and_grads(1)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    # The two passes add a parameter's gradient up in different orders, so they differ by
    # float32 rounding of the sum: a few eps (1.2e-7) times the tensor's largest term and the
    # square root of the terms summed (~10² tokens), not of each element's own size. Bound:
    # 1e-5 of the tensor's largest gradient (measured over 20 draws: at most 7e-7 of it).
    for got, want in zip(shared_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


# chunk_rows below, equal to and above the group: a group larger than chunk_rows is a chunk
@pytest.mark.parametrize("chunk_rows", [1, 2, 4])
def test_chunked_scoring_without_gradient_equals_one_pass(checkpoints, chunk_rows):
    chunked, _ = build(checkpoints["llama"], chunk_rows=chunk_rows)
    prompts, prompt_mask, _ = padded_batch(2)
    tokens = prompts.repeat_interleave(2, dim=0)
    mask = prompt_mask.repeat_interleave(2, dim=0)
    with torch.no_grad():
        got, hidden = chunked.completion_logits_and_hidden(tokens, mask, PROMPT_LEN, 2)
        chunked.chunk_rows = None
        want, want_hidden = chunked.completion_logits_and_hidden(tokens, mask, PROMPT_LEN, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_pass_gives_the_logits_and_the_hidden_states_of_two(checkpoints, arch, group_size):
    """PPO's critic reads the hidden states of the pass that scored the rollout: its logits
    are completion_logits' to the bit, and its states are those a second pass returns as the
    last of ``output_hidden_states`` (the lm head's input), to the bit where that pass is the
    same one (no shared prompt), and the head turns them into the logits."""
    policy, _ = build(checkpoints[arch])
    prompts, prompt_mask, _ = padded_batch(3)
    tokens = prompts.repeat_interleave(group_size, dim=0)
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    with torch.no_grad():
        logits, hidden = policy.completion_logits_and_hidden(tokens, mask, PROMPT_LEN,
                                                             group_size)
        assert torch.equal(logits, policy.completion_logits(tokens, mask, PROMPT_LEN,
                                                            group_size))
        second = policy.model(input_ids=tokens[:, :-1], attention_mask=mask[:, :-1].long(),
                              position_ids=padded_positions(mask[:, :-1], tokens.shape[1] - 1),
                              output_hidden_states=True).hidden_states[-1][:, PROMPT_LEN - 1:]
        assert hidden.shape == (tokens.shape[0], NEW_TOKENS, policy.hidden_size)
        if group_size == 1:
            assert torch.equal(hidden, second)
        torch.testing.assert_close(hidden, second, rtol=0, atol=1e-5)
        torch.testing.assert_close(policy.model.lm_head(hidden), logits, rtol=0, atol=1e-5)


# --- (b) the cache ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_decoding_equals_a_full_forward_pass(checkpoints, arch):
    policy, _ = build(checkpoints[arch])
    tokens, mask, _ = padded_batch(4)
    with torch.no_grad():
        full = policy(tokens, mask)
        cache = policy.new_cache(3, tokens.shape[1])
        steps = [policy(tokens[:, :PROMPT_LEN], mask[:, :PROMPT_LEN], cache)]
        for t in range(PROMPT_LEN, tokens.shape[1]):
            steps.append(policy(tokens[:, t:t + 1], mask[:, :t + 1], cache))
    # padding positions carry no prediction; every real one must agree
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask], full[mask], rtol=0, atol=1e-5)
    # a prefill that keeps the last position's logits only, as sampling asks for them
    with torch.no_grad():
        last = policy(tokens[:, :PROMPT_LEN], mask[:, :PROMPT_LEN],
                      policy.new_cache(3, tokens.shape[1]), last_only=True)
    assert last.shape == (3, 1, policy.vocab_size)
    torch.testing.assert_close(last, steps[0][:, -1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_repeated_cache_shares_its_prefill_and_keeps_the_original(checkpoints, arch):
    policy, _ = build(checkpoints[arch])
    prompts, prompt_mask, _ = padded_batch(5)
    prompts, prompt_mask = prompts[:, :PROMPT_LEN], prompt_mask[:, :PROMPT_LEN]
    next_tokens = torch.randint(2, 300, (9, 1))
    step_mask = torch.cat([prompt_mask.repeat_interleave(3, 0), torch.ones(9, 1, dtype=bool)], 1)
    with torch.no_grad():
        cache = policy.new_cache(3, PROMPT_LEN + 1)
        policy(prompts, prompt_mask, cache)
        got = policy(next_tokens, step_mask, cache.repeat_interleave(3, PROMPT_LEN + 1))
        want = policy(torch.cat([prompts.repeat_interleave(3, 0), next_tokens], 1), step_mask)
    torch.testing.assert_close(got[:, -1], want[:, -1], rtol=0, atol=1e-5)
    assert cache.inner.get_seq_length() == PROMPT_LEN
    assert cache.inner.layers[0].keys.shape[0] == 3


# --- (c) sampling -----------------------------------------------------------------------------

def test_generate_on_left_padded_prompts_masks_after_eos_and_logs_sampling_logprobs(checkpoints):
    policy, _ = build(checkpoints["llama"])
    eos = 1
    # an EOS-prone head, so that rows end at different steps
    head = policy.model.lm_head
    policy.model.lm_head = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        policy.model.lm_head.weight.copy_(head.weight)
        policy.model.lm_head.bias.zero_()
        policy.model.lm_head.bias[eos] = 4.0
    policy.eval()
    tokens, mask, _ = padded_batch(6)
    prompts = Prompts(tokens[:, :PROMPT_LEN], mask[:, :PROMPT_LEN])
    torch.manual_seed(0)
    rollout = generate(policy, prompts, n_per_prompt=4, max_new_tokens=8, eos_id=eos,
                       temperature=0.7)
    lengths = rollout.mask.sum(1)
    assert 1 <= int(lengths.min()) < int(lengths.max())
    for row, keep in zip(rollout.completions.tolist(), rollout.mask.tolist(), strict=True):
        n = sum(keep)
        assert keep == [True] * n + [False] * (len(keep) - n)
        assert eos not in row[:n - 1] and all(t == eos for t in row[n:])
        assert row[n - 1] == eos or n == 8
    assert torch.equal(rollout.prompts, prompts.tokens.repeat_interleave(4, dim=0))
    with torch.no_grad():
        logp = token_logprobs(completion_logits(policy, rollout, temperature=0.7),
                              rollout.completions)
    torch.testing.assert_close(rollout.old_logp, logp * rollout.mask, rtol=0, atol=1e-5)


# --- (d) LoRA ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's
def test_lora_reference_is_the_base_model_and_only_the_adapter_trains(checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    policy, reference = build(checkpoints["llama"], lora=lora)
    assert isinstance(reference, AdapterDisabled)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert [p.numel() for p in reference.parameters()] == [0]  # the policy is not counted twice
    tokens, mask, _ = padded_batch(7)
    completions = tokens[:, PROMPT_LEN:]

    def reference_logp():
        return token_logprobs(reference.completion_logits(tokens, mask, PROMPT_LEN), completions)

    start = reference_logp()
    torch.testing.assert_close(
        token_logprobs(policy.completion_logits(tokens, mask, PROMPT_LEN), completions), start)

    policy.train()
    reference.eval()  # as the pair calls it before scoring
    assert policy.training and {n for n, p in policy.named_parameters()
                                if p.requires_grad} == trainable
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    loss = -token_logprobs(policy.completion_logits(tokens, mask, PROMPT_LEN), completions).sum()
    loss.backward()
    optimizer.step()

    after = dict(policy.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert all(not torch.equal(after[n], p) for n, p in adapter.items() if "lora_B" in n)
    torch.testing.assert_close(reference_logp(), start, rtol=0, atol=0)
    policy.eval()
    with torch.no_grad():
        trained = policy.completion_logits(tokens, mask, PROMPT_LEN)
    assert not torch.allclose(token_logprobs(trained, completions), start)

    save_adapter(policy, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoints["llama"]),
                                       tmp_path / "adapter")
    with torch.no_grad():
        again = HFCausalLM(loaded.eval()).completion_logits(tokens, mask, PROMPT_LEN)
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)


def test_lora_all_linear_on_gpt2_conv1d_layers(checkpoints):
    policy, reference = build(checkpoints["gpt2"], lora={"r": 2})
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in policy.named_parameters()
               if p.requires_grad}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    tokens, mask, _ = padded_batch(8)
    with torch.no_grad():
        torch.testing.assert_close(reference.completion_logits(tokens, mask, PROMPT_LEN),
                                   policy.eval().completion_logits(tokens, mask, PROMPT_LEN))


def test_full_fine_tuning_reference_is_a_frozen_copy(checkpoints):
    policy, reference = build(checkpoints["gpt2"])
    assert policy.training and not reference.training
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    assert not set(map(id, policy.parameters())) & set(map(id, reference.parameters()))
    # the GPT-2 checkpoint's 0.1 dropouts are off: train mode scores as eval mode does
    tokens, mask, _ = padded_batch(9)
    with torch.no_grad():
        torch.testing.assert_close(policy.completion_logits(tokens, mask, PROMPT_LEN),
                                   reference.completion_logits(tokens, mask, PROMPT_LEN))


def test_a_reference_name_is_loaded_frozen_beside_the_policy(checkpoints, tmp_path):
    other = str(save_tiny_model(tmp_path / "other", "llama", seed=2))
    policy, reference = build(checkpoints["llama"], reference_name=other)
    alone, _ = build(other)
    tokens, mask, _ = padded_batch(10)
    with torch.no_grad():
        torch.testing.assert_close(reference.completion_logits(tokens, mask, PROMPT_LEN),
                                   alone.completion_logits(tokens, mask, PROMPT_LEN))
        assert not torch.allclose(policy.completion_logits(tokens, mask, PROMPT_LEN),
                                  alone.completion_logits(tokens, mask, PROMPT_LEN))
    assert not any(p.requires_grad for p in reference.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(checkpoints):
    tokens, mask, _ = padded_batch(11)
    tokens = tokens.repeat_interleave(2, dim=0)
    mask = mask.repeat_interleave(2, dim=0)

    def grads(**keys) -> list[torch.Tensor]:
        policy, _ = build(checkpoints["llama"], **keys)
        assert policy.model.is_activation_checkpointing == bool(keys)
        logits = policy.completion_logits(tokens, mask, PROMPT_LEN, group_size=2)
        token_logprobs(logits, tokens[:, PROMPT_LEN:]).sum().backward()
        return [p.grad for p in policy.parameters()]

    for got, want in zip(grads(gradient_checkpointing=True), grads(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_dtype_sets_the_weights_dtype(checkpoints):
    policy, reference = build(checkpoints["llama"], dtype="bfloat16")
    assert {p.dtype for p in policy.parameters()} == {torch.bfloat16}
    tokens, mask, _ = padded_batch(12)
    with torch.no_grad():
        assert reference.completion_logits(tokens, mask, PROMPT_LEN).dtype == torch.bfloat16


def test_tokenizer_pads_left_with_eos(checkpoints):
    tokenizer = load_tokenizer(hf_node(name=checkpoints["gpt2"]))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.eos_token
    batch = tokenizer(["good", "What is 2 + 3?"], padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"][0, 0]) and bool(batch["attention_mask"][0, -1])
    assert load_tokenizer(hf_node()) is None


# --- (e) a random arch trained by the task's recipe -------------------------------------------

def counting_recipe(cache_dir: str) -> ReferenceRecipe:
    """Sequences that count up mod 11 from a random start, then EOS (id 11)."""

    def sample_batch(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, 11, (16, 1), generator=generator)
        tokens = (start + torch.arange(PROMPT_LEN + NEW_TOKENS)) % 11
        tokens[:, -1] = 11
        return tokens, torch.ones(16, tokens.shape[1] - 1)

    return ReferenceRecipe(key={"task": "counting"}, sample_batch=sample_batch, steps=60,
                           lr=1e-2, seed=0, cache_dir=cache_dir)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_a_random_arch_is_trained_by_the_recipe_and_cached(tmp_path, arch):
    task = StandInTask(name="counting", vocab_size=12, eos_id=11,
                       recipe=counting_recipe(str(tmp_path)))
    node = hf_node(name=None, arch=arch, n_layer=1, n_head=2, n_embd=16)
    state = torch.random.get_rng_state()
    policy, reference = build_hf(node, task)
    assert torch.equal(torch.random.get_rng_state(), state)  # nor does building move it
    assert policy.vocab_size == reference.vocab_size == 12
    assert len(list(tmp_path.glob("counting-*.pt"))) == 1
    tokens = (torch.arange(PROMPT_LEN + NEW_TOKENS) + 3)[None] % 11
    tokens[:, -1] = 11
    with torch.no_grad():
        logp = token_logprobs(reference.completion_logits(tokens, None, PROMPT_LEN),
                              tokens[:, PROMPT_LEN:])
        torch.testing.assert_close(policy.completion_logits(tokens, None, PROMPT_LEN),
                                   reference.completion_logits(tokens, None, PROMPT_LEN))
    assert float(logp.mean()) > -1.0  # learnt to count (uniform: log 1/12 = -2.5)
    _, cached = build_hf(node, task)
    for got, want in zip(cached.state_dict().values(), reference.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_init_weights_draws_from_the_global_generator(checkpoints):
    policy, _ = build(checkpoints["llama"])

    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        policy.init_weights()
        return torch.cat([p.detach().flatten() for p in policy.parameters()])

    first = draw(0)
    torch.testing.assert_close(draw(0), first, rtol=0, atol=0)
    assert not torch.equal(draw(1), first)


# --- chunked log-probs --------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_rows", [None, 1, 2, 5])
def test_chunked_logprobs_equal_one_log_softmax_with_their_gradient(chunk_rows):
    torch.manual_seed(0)
    full = torch.randn(5, 8, 50, requires_grad=True)
    logits = full[:, 1:]  # a non-contiguous view, as completion slices are
    tokens = torch.randint(0, 50, (5, 7))
    weights = torch.randn(5, 7)
    got = token_logprobs(logits, tokens, chunk_rows)
    (grad_got,) = torch.autograd.grad((got * weights).sum(), full)
    want = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    (grad_want,) = torch.autograd.grad((want * weights).sum(), full)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-6)
