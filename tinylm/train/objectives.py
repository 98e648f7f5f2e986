"""Objectives: what a training step minimises, apart from everything else a step does.

An objective turns one micro-batch into ``(loss, metrics)``: ``loss`` a scalar Tensor (the
mean over the batch's units: tokens, pairs, answers), ``metrics`` a dict of floats that the
trainer logs (rewards, accuracies, ...). It may return ``None`` for the loss to say "this
batch trains nothing" (an SFT batch whose every token is masked): the trainer skips it and
counts it, rather than stepping on a NaN. Everything else (accumulation, clipping, schedule,
evaluation, checkpoints, exact resume, NaN guard, progress bar, JSONL log, plots) belongs to
tinylm.train.loop.Trainer, written once.

An objective that keeps random state (sampling answers for RL, say) offers ``state()`` and
``set_state(s)`` (JSON-able); the trainer saves it in every checkpoint.
"""
from __future__ import annotations


class Objective:
    name = "objective"

    def loss(self, model, batch):  # pragma: no cover - abstract
        """(loss Tensor or None, metrics dict). None: the batch trains nothing (skipped and
        counted). On several ranks also 0.0: this rank's share holds nothing, others' does
        (tinylm/distributed/posttrain.py's TokenShare): it counts as a zero-loss micro-batch."""
        raise NotImplementedError

    def state(self) -> dict | None:
        return None

    def set_state(self, state: dict | None) -> None:
        pass


class NextToken(Objective):
    """Pretraining: mean cross-entropy of every next token. batch = (inputs, targets) (B, T)."""

    name = "pretrain"

    def loss(self, model, batch):
        x, y = batch
        _, loss = model(x, y, return_logits=False)  # fused head + loss: no (B, T, V) logits
        return loss, {}
