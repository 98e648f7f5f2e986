"""Supervised fine-tuning on chat data: masked next-token cross-entropy.

The loss is ``F.cross_entropy`` over the trained targets only (assistant content and its
end-of-turn; tinylm.posttrain.chat decides which while rendering), averaged over those tokens.
A batch with no trained target returns ``None``: the Trainer skips it and counts it, so an
all-masked batch never becomes a NaN or a zero-gradient step. SFTRows (tinylm.posttrain.data)
already keeps every row trainable; the check here is the guarantee.

``sft_sequences`` renders conversations (from JSONL files or the built-in task) into
(ids, mask) pairs fitted to the context.
"""
from __future__ import annotations

import numpy as np

from tinylm.posttrain.chat import IGNORE
from tinylm.tensor import no_grad
from tinylm.train.objectives import Objective


class SFT(Objective):
    name = "sft"

    def loss(self, model, batch):
        x, y = batch
        n = int((y != IGNORE).sum())
        if n == 0:
            return None, {}
        _, loss = model(x, y, ignore_index=IGNORE, return_logits=False)  # fused head + loss
        return loss, {"trained_tokens": float(n)}


def sft_sequences(chat, conversations: list, fit) -> list:
    """Rendered, fitted (ids, mask) of each conversation (list of messages); ``fit`` drops and
    counts those that cannot be trained."""
    out = []
    for msgs in conversations:
        r = fit(*chat.render(msgs))
        if r is not None:
            out.append(r)
    return out


def evaluate_sft(model, batches) -> float:
    """Mean masked loss per trained token over fixed batches, without autograd."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with no_grad():
        for x, y in batches:
            n = int((y != IGNORE).sum())
            if n:
                total += model(x, y, ignore_index=IGNORE, return_logits=False)[1].item() * n
                count += n
    model.train(was)
    return total / max(count, 1) if count else float("nan")


def trained_share(batch) -> float:
    _, y = batch
    return float(np.mean(y != IGNORE))
