"""Sampling a large batch a chunk of rows at a time: the tokens of one batch, and the random
state one batch leaves (DPO's offline data set is drawn so, within its memory bound)."""

import pytest
import torch

from klsweep.config import choice_config
from klsweep.models.tiny import TinyGPT
from klsweep.rollout import Prompts, exponential_race, generate

EOS = 10


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(choice_config("model", "tiny", n_layer=2, n_head=4, n_embd=64),
                   vocab_size=EOS + 1, block_size=16).eval()


def _sample(model: TinyGPT, prompts: Prompts, max_rows: int | None):
    torch.manual_seed(1)
    rollout = generate(model, prompts, n_per_prompt=2, max_new_tokens=10, eos_id=EOS,
                       temperature=0.9, max_rows=max_rows)
    return rollout, torch.get_rng_state(), torch.rand(3)


@pytest.fixture
def one_thread():
    """Runs use one torch thread (``threads: 1``). With two, MKL splits a product's rows among
    the threads by the batch's size, and on an AMD EPYC a row's log-prob then moves by an ulp
    (4.8e-7 at 3.1) between a 384-row batch and a 256-row chunk; with one, rows are rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_chunks_of_rows_sample_the_tokens_of_one_batch_and_leave_its_random_state(one_thread):
    model = _model()
    prompts = Prompts.unpadded(torch.randint(0, EOS, (384, 6), generator=torch.Generator()
                                             .manual_seed(2)))
    whole, whole_state, whole_next = _sample(model, prompts, max_rows=None)
    chunked, chunked_state, chunked_next = _sample(model, prompts, max_rows=256)

    ended = whole.mask.sum(1)
    assert 0 < int((ended < 10).sum()) < len(ended)  # rows end at EOS, not all at once
    for name in ("tokens", "mask", "old_logp"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert torch.equal(chunked_state, whole_state)
    assert torch.equal(chunked_next, whole_next)


def test_the_race_raises_on_a_broken_distribution_as_multinomial_does():
    probs = torch.tensor([[0.5, float("nan")]])
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        torch.multinomial(probs, 1)
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        exponential_race(probs, torch.ones_like(probs))
