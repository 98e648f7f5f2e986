"""Direct Preference Optimization (Rafailov et al. 2023) with a frozen, cached reference.

The loss is a small pure function of four sequence log-probabilities per pair:

    r_c = beta (log pi(y_c|x) - log ref(y_c|x)),  r_r = beta (log pi(y_r|x) - log ref(y_r|x))
    loss = -log sigmoid(r_c - r_r)           (mean over pairs; = ln 2 when pi = ref)

``dpo_loss`` takes them as tensors (or arrays, for the reference) and returns the loss and the
two rewards; it knows nothing of models or batches, so its identities (ln 2 at equality) and its
gradient (``tinylm.gradcheck``) are tested on it alone. -log sigmoid(z) = softplus(-z) is one
Function here, computed as max(-z, 0) + log1p(exp(-|z|)) so a large margin neither overflows
nor loses its gradient.

The reference is the init checkpoint (with LoRA: the same model with its adapters disabled).
Its log-probs are computed once per pair before the first step (``reference_logprobs``), kept
with the pair and saved in the run directory (``ref_logprobs.safetensors``), so no epoch and
no resume recomputes them. Sequence log-probs are over the response tokens only (content and
<|end|>), summed (``average_logprobs``: mean), in float64, through the fused LM head: the
(2P, T, V) logits are never made (``model.sequence_logprobs``, tinylm/posttrain/logprobs.py).

Logged each step: loss, chosen and rejected rewards, reward margin, reward accuracy (the share
of pairs with r_c > r_r).

Leaves out: IPO / cDPO label smoothing, reference-free variants, the reference model updated
during training (TR-DPO).
"""
from __future__ import annotations

import numpy as np

from tinylm.backend import xp_of
from tinylm.posttrain.data import EpochOrder, padded_batch
from tinylm.tensor import Function, Tensor, no_grad
from tinylm.train.objectives import Objective


class Softplus(Function):
    saved_lowp = ("x",)

    def forward(self, x):  # softplus(x) = log(1 + exp(x)), stable for any x
        xp = xp_of(x)
        self.x = x
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, dout):
        xp = xp_of(dout)
        # d softplus / dx = sigmoid(x), written so that exp never overflows
        e = xp.exp(-xp.abs(self.x))
        sig = xp.where(self.x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return (dout * sig,)


def softplus(x: Tensor) -> Tensor:
    return Softplus.apply(x)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(P,) log-probs -> (mean loss Tensor, chosen rewards (P,), rejected rewards (P,) arrays)."""
    chosen = (policy_chosen - ref_chosen) * beta
    rejected = (policy_rejected - ref_rejected) * beta
    loss = softplus(rejected - chosen).mean()  # -log sigmoid(chosen - rejected)
    return loss, np.asarray(chosen.data, dtype=np.float64), np.asarray(rejected.data, dtype=np.float64)


# ---- pairs ------------------------------------------------------------------------------------
def render_pairs(chat, records: list, fit) -> list[dict]:
    """Each {"prompt", "chosen", "rejected"} as two rendered sequences; pairs that do not fit
    (fit returns None for either side) are dropped and counted by ``fit``."""
    out = []
    for rec in records:
        c = fit(*chat.render_reply(rec["prompt"], rec["chosen"]))
        r = fit(*chat.render_reply(rec["prompt"], rec["rejected"]))
        if c is not None and r is not None:
            out.append({"chosen": c, "rejected": r})
    return out


def pair_batch(pairs: list, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """P pairs -> x, y (2P, T): the chosen rows, then the rejected rows, padded to the longest;
    y is the next token on response tokens and IGNORE elsewhere."""
    return padded_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)


def reference_logprobs(model, pairs: list, pad_id: int, batch_size: int = 16, average: bool = False) -> np.ndarray:
    """(P, 2) float64 sequence log-probs of (chosen, rejected) under ``model``, without autograd."""
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    was = model.training
    model.eval()
    with no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            x, y = pair_batch(chunk, pad_id)
            lp = model.sequence_logprobs(x, y, average=average).numpy()
            n = len(chunk)
            out[s:s + n, 0], out[s:s + n, 1] = lp[:n], lp[n:]
    model.train(was)
    return out


class PairBatches(EpochOrder):
    """Shuffled batches of pairs, each with its cached reference log-probs, for the Trainer."""

    def __init__(self, pairs: list, ref: np.ndarray, batch_size: int, seed: int, pad_id: int):
        if not pairs:
            raise ValueError("no preference pairs left (all bad or too long)")
        self.pairs, self.ref, self.pad_id = pairs, ref, pad_id
        self._init_order(len(pairs), min(batch_size, len(pairs)), seed)
        lens = [len(p["chosen"][0]) + len(p["rejected"][0]) for p in pairs]
        self.tokens_per_batch = int(np.mean(lens) * self.B)

    def next(self) -> dict:
        take = self._take()
        x, y = pair_batch([self.pairs[i] for i in take], self.pad_id)
        return {"x": x, "y": y, "ref": self.ref[take]}


class DPO(Objective):
    name = "dpo"

    def __init__(self, beta: float = 0.1, average: bool = False):
        self.beta, self.average = float(beta), bool(average)

    def loss(self, model, batch):
        x, y, ref = batch["x"], batch["y"], batch["ref"]
        P = len(ref)
        lp = model.sequence_logprobs(x, y, average=self.average)  # (2P,) float64, fused head
        loss, rc, rr = dpo_loss(lp[:P], lp[P:], ref[:, 0], ref[:, 1], self.beta)
        return loss, {"reward_chosen": float(rc.mean()), "reward_rejected": float(rr.mean()),
                      "reward_margin": float((rc - rr).mean()), "reward_accuracy": float((rc > rr).mean())}


def evaluate_pairs(model, pairs, ref, beta, pad_id, average=False, batch_size: int = 16) -> float:
    """Mean DPO loss over held-out pairs (the validation number), without autograd."""
    if not pairs:
        return float("nan")
    was = model.training
    model.eval()
    total = 0.0
    with no_grad():
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            x, y = pair_batch(chunk, pad_id)
            lp = model.sequence_logprobs(x, y, average=average)
            n = len(chunk)
            loss, _, _ = dpo_loss(lp[:n], lp[n:], ref[s:s + n, 0], ref[s:s + n, 1], beta)
            total += loss.item() * n
    model.train(was)
    return total / len(pairs)
