"""The default task: its language, its reward and its cached reference model."""

import torch
from omegaconf import OmegaConf

from klsweep.config import choice_config
from klsweep.models import build_models
from klsweep.tasks.digits import DigitsTask, digit_reward

MODEL = OmegaConf.create({"kind": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 16,
                          "dropout": 0.0})


def _reference(task: DigitsTask):
    return build_models(MODEL, task)[1]


def test_sequences_follow_the_language():
    task = DigitsTask(choice_config("task", "digits"))
    tokens, targets = task.sample_sequences(2000, torch.Generator().manual_seed(0))
    completion = tokens[:, task.prompt_len:]
    lengths = (completion < 10).sum(1)
    assert lengths.min() >= 8 and lengths.max() <= 12
    # each row is digits then EOS only
    eos_at = (completion == task.EOS).int().argmax(1)
    assert torch.equal(eos_at, lengths)
    # +1 steps: p_step + (1 - p_step)/10 of transitions = 0.64; 2000·11 transitions give a
    # standard error of about 0.0032, so 4 standard errors is 0.013
    prev, nxt = tokens[:, task.prompt_len - 1:-1], tokens[:, task.prompt_len:]
    valid = (prev < 10) & (nxt < 10)
    steps = ((prev + 1) % 10 == nxt) & valid
    assert abs(steps.sum() / valid.sum() - 0.64) < 0.013
    assert targets.shape == (2000, tokens.shape[1] - 1)


def test_reward_is_the_mean_digit_over_nine():
    completions = torch.tensor([[9, 9, 11, 11], [0, 9, 3, 11], [11, 11, 11, 11]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True],
                         [True, False, False, False]])
    torch.testing.assert_close(digit_reward(completions, mask), torch.tensor([1.0, 4 / 9, 0.0]))


def test_the_reference_is_cached_and_a_miss_leaves_the_random_state_as_a_hit_does(tmp_path):
    task = DigitsTask(choice_config("task", "digits", cache_dir=str(tmp_path),
                                    reference_steps=5, reference_batch_size=8))
    torch.manual_seed(0)
    trained = _reference(task)
    after_miss = torch.rand(3)
    assert len(list(tmp_path.glob("digits-*.pt"))) == 1
    torch.manual_seed(0)
    loaded = _reference(task)
    after_hit = torch.rand(3)
    assert torch.equal(after_miss, after_hit)
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the weights depend on the task's reference seed, not on the run's seed
    torch.manual_seed(1)
    other = _reference(DigitsTask(choice_config("task", "digits",
                                                cache_dir=str(tmp_path / "other"),
                                                reference_steps=5, reference_batch_size=8)))
    for a, b in zip(trained.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b)
