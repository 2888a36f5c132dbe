"""The progress bar: the run's own step count with its reward, KL and β, not Lightning's
``Epoch 0/0 … v_num`` (a klsweep run is one epoch of prompts)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


def step_line(row: dict[str, float]) -> str:
    return (f"reward {row['reward/mean']:.3f} · KL {row['kl/mean']:.4f} · "
            f"β {row['kl/beta']:.4g}")


class StepProgressBar(TQDMProgressBar):
    """``step 12/200 |███   | 00:03<00:40, reward 0.512 · KL 0.0481 · β 0.0502``; a resumed
    run's bar starts at the step it resumed from."""

    BAR_FORMAT = "step {n_fmt}/{total_fmt} |{bar:24}| {elapsed}<{remaining}{postfix}"

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.total, bar.initial, bar.n = module.steps, module.step_count, module.step_count
        bar.refresh()

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        bar = self.train_progress_bar
        if self._should_update(module.step_count, module.steps):
            bar.n = module.step_count
            bar.set_postfix_str(step_line(module.history[-1]))  # refreshes the bar

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if self._leave:
            self.train_progress_bar.close()
