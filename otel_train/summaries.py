"""Run-level bookkeeping behind `eval.*`, `epoch.*` and `final.*`: bests, totals, last loss.

Kept apart from the step clock: these are host numbers updated from each sampled step's
resolved values, read when an event is exported.
"""

from __future__ import annotations

import math
import time

from otel_train.staging import safe_exp


class RunSummaries:
    """Totals, the last loss, epoch accumulators and the best evaluation results."""

    def __init__(self, *, start_time: float, start_step: int, perplexity: bool) -> None:
        self.perplexity = perplexity  # the loss is a token cross-entropy (pretrain, SFT)
        self.start_wall = time.time()
        self.tokens_total = 0.0
        self.samples_total = 0.0
        self.tokens_seen = False  # a token count was ever recorded (else totals are absent)
        self.last_loss: float | None = None
        self.best_eval_loss = math.inf
        self.best_perplexity = math.inf
        self._epoch_start = (start_time, start_step, 0.0, 0.0)
        # Running sums over every recorded loss (not the sampled ones): a run that never ends
        # an epoch must not grow per step. Offsets carry values taken early by end_epoch().
        self._epoch_loss_sum = 0.0
        self._epoch_loss_count = 0
        self.epochs_ended = 0

    def add_counts(self, tokens: float | None, samples: float | None) -> None:
        if tokens is not None:
            self.tokens_total += tokens
            self.tokens_seen = True
        if samples is not None:
            self.samples_total += samples

    def add_losses(self, mean: float, last: float, count: int) -> None:
        """One interval of training losses: `count` values whose mean is `mean`."""
        self.last_loss = last
        self._epoch_loss_sum += mean * count
        self._epoch_loss_count += count

    def eval_values(self, values: dict[str, float]) -> dict[str, float]:
        """Adds eval.perplexity / eval.best_perplexity for cross-entropy stages."""
        loss = values.get("eval.loss")
        if loss is None:
            return values
        if math.isfinite(loss):
            self.best_eval_loss = min(self.best_eval_loss, loss)
        if self.perplexity:
            perplexity = safe_exp(loss)
            values["eval.perplexity"] = perplexity
            if math.isfinite(perplexity):
                self.best_perplexity = min(self.best_perplexity, perplexity)
            if math.isfinite(self.best_perplexity):
                values["eval.best_perplexity"] = self.best_perplexity
        return values

    def epoch_values(
        self, epoch: float | None, *, now: float, step: int, pending_loss: tuple[float, int]
    ) -> dict[str, float]:
        """`epoch.*` of the epoch that ends now; `pending_loss` = (sum, count) of losses
        recorded but not yet exported, which count for this epoch, not the next."""
        start_time, start_step, start_tokens, start_samples = self._epoch_start
        duration = max(now - start_time, 0.0)
        self.epochs_ended += 1
        values = {
            "epoch.number": float(epoch if epoch is not None else self.epochs_ended),
            "epoch.steps": float(step - start_step),
            "epoch.samples": self.samples_total - start_samples,
            "epoch.duration": duration,
        }
        if self.tokens_seen:
            values["epoch.tokens"] = self.tokens_total - start_tokens
            if duration > 0:
                values["epoch.tokens_per_second"] = values["epoch.tokens"] / duration
        pending_sum, pending_count = pending_loss
        count = self._epoch_loss_count + pending_count
        if count:
            values["epoch.train_loss_mean"] = (self._epoch_loss_sum + pending_sum) / count
        self._epoch_start = (now, step, self.tokens_total, self.samples_total)
        # The pending losses will be added again when their interval is exported.
        self._epoch_loss_sum, self._epoch_loss_count = -pending_sum, -pending_count
        return values

    def final_values(self, step: int) -> dict[str, float]:
        values = {
            "final.total_steps": float(step),
            "final.total_samples": self.samples_total,
            "final.wall_time": time.time() - self.start_wall,
        }
        if self.tokens_seen:
            values["final.total_tokens"] = self.tokens_total
        if math.isfinite(self.best_eval_loss):
            values["final.best_eval_loss"] = self.best_eval_loss
        if self.perplexity and math.isfinite(self.best_perplexity):
            values["final.best_perplexity"] = self.best_perplexity
        if self.last_loss is not None:
            values["final.train_loss"] = self.last_loss  # NaN stays NaN: a diverged run
        return values
