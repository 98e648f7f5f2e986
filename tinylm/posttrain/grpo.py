"""RL with a verifiable reward: group-relative policy optimisation (Shao et al. 2024, GRPO).

Each step, for each prompt of the batch: sample a group of G answers from the current policy,
score each with a reward function, and set each answer's advantage to its reward minus the
group's mean (divided by the group's standard deviation with ``scale_std``). A group whose
rewards are all equal carries no signal: it leaves the loss *and its denominator* (it is not
averaged in as zeros). The update is the on-policy policy gradient over the remaining answers'
tokens,

    loss = -(1 / N) sum_i A_i sum_t log pi(o_it | prompt, o_i<t)  +  kl_coef * (1 / N) sum_it KL_it

with N the number of answer tokens in the kept groups (a token-level mean, as DAPO), and KL_it
the k3 estimate exp(d) - d - 1, d = log ref - log pi, against the reference (the init
checkpoint; with LoRA the same model with adapters disabled). One gradient step per sample,
so the importance ratio is 1 and PPO's clipping never acts: it is left out.

A reward is a plain Python function ``reward(record, completion) -> float``: ``record`` is the
prompt's data line (for the built-in task it holds "answer"), ``completion`` the answer's text
without its end-of-turn token. ``load_reward("module:function")`` or ``"path/file.py:function"``
finds one.

Leaves out: PPO's clipped ratio with several epochs per sample, a value model, process rewards.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np

from tinylm.generate import generate
from tinylm.posttrain.chat import IGNORE
from tinylm.posttrain.data import EpochOrder, padded_batch
from tinylm.tensor import no_grad
from tinylm.train.objectives import Objective


def group_advantages(rewards, scale_std: bool = True, eps: float = 1e-6):
    """Rewards (G,) -> advantages (G,), or None when every reward is equal (the group is left
    out). ``scale_std``: divide by the group's (population) standard deviation."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0 or np.all(r == r[0]):
        return None
    a = r - r.mean()
    if scale_std:
        a = a / (r.std() + eps)
    return a


def load_reward(spec: str):
    """"module:function" or "path/to/file.py:function" -> the function."""
    mod_name, sep, fn = spec.rpartition(":")
    if not sep or not mod_name or not fn:
        raise ValueError(f"reward {spec!r}: expected module:function or file.py:function")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: {path} not found")
        s = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    f = getattr(mod, fn, None)
    if not callable(f):
        raise ValueError(f"reward {spec!r}: {mod_name} has no function {fn!r}")
    return f


class PromptBatches(EpochOrder):
    """Shuffled batches of prompt records (epoch by epoch, seeded, resumable)."""

    def __init__(self, records: list, batch_size: int, seed: int):
        if not records:
            raise ValueError("no prompts")
        self.records = records
        self.tokens_per_batch = 0
        self._init_order(len(records), min(batch_size, len(records)), seed)

    def next(self) -> list:
        return [self.records[i] for i in self._take()]


def sample_group(model, chat, messages, G: int, max_new_tokens: int, seed: int, **sampling):
    """G answers to one prompt: (prompt ids, list of G answer id lists, each cut after its first
    <|end|> (kept) or at max_new_tokens)."""
    p = chat.render_prompt(messages)
    room = model.config.block_size - len(p)
    n = min(max_new_tokens, room)
    if n < 1:
        raise ValueError(f"a prompt of {len(p)} tokens leaves no room in the context of {model.config.block_size}")
    out = generate(model, np.array([p] * G, dtype=np.int64), n, seed=seed, stop_tokens=[chat.end_id], **sampling)
    answers = []
    for row in out[:, len(p):].tolist():
        if chat.end_id in row:
            row = row[:row.index(chat.end_id) + 1]
        answers.append(row)
    return p, answers


class GRPO(Objective):
    name = "grpo"

    def __init__(self, chat, reward_fn, group_size: int = 8, max_new_tokens: int = 16, temperature: float = 1.0,
                 top_k: int | None = None, scale_std: bool = True, kl_coef: float = 0.0, reference=None,
                 seed: int = 0):
        """``reference``: a context manager factory giving the reference model (None: no KL)."""
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        self.chat, self.reward_fn, self.G = chat, reward_fn, group_size
        self.max_new, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.scale_std, self.kl_coef, self.reference = scale_std, kl_coef, reference
        self.rng = np.random.default_rng(seed)
        # [distributed #14] (rank, ranks): the batch given to ``loss`` is this rank's contiguous
        # share of a global batch of ranks x len(batch) prompts; seeds are drawn for all of them
        self.share = (0, 1)
        self.last_tokens = 0  # answer tokens in the kept groups of the last ``loss`` call

    def seeds(self, n: int) -> list[int]:
        """The sampling seeds of this rank's ``n`` prompts: one per prompt of the global batch,
        drawn in its order from the one generator every rank holds, and this rank's slice, so a
        prompt gets the seed it gets in one process, whatever the number of ranks."""
        rank, ranks = self.share
        every = [int(self.rng.integers(2**62)) for _ in range(n * ranks)]
        return every[rank * n:(rank + 1) * n]

    def state(self):
        return {"rng": self.rng.bit_generator.state}

    def set_state(self, state):
        if state:
            self.rng.bit_generator.state = state["rng"]

    def loss(self, model, batch):
        end = self.chat.end_id
        rows, advs, rewards_all, lens = [], [], [], []
        for rec, seed in zip(batch, self.seeds(len(batch))):
            p, answers = sample_group(model, self.chat, rec["prompt"], self.G, self.max_new, seed,
                                      temperature=self.temperature, top_k=self.top_k)
            texts = [self.chat.tok.decode([t for t in a if t != end]) for a in answers]
            rewards = [float(self.reward_fn(rec, t)) for t in texts]
            rewards_all.extend(rewards)
            lens.extend(len(a) for a in answers)
            a = group_advantages(rewards, self.scale_std)
            if a is None:
                continue  # all equal: no signal, and not in the denominator
            for ans, adv in zip(answers, a):
                rows.append((p, ans))
                advs.append(adv)
        metrics = {"reward": float(np.mean(rewards_all)), "groups_kept": len(advs) / self.G / len(batch),
                   "answer_tokens": float(np.mean(lens))}
        kl_on = self.kl_coef > 0 and self.reference is not None
        if kl_on:
            metrics["kl"] = 0.0  # the same keys with and without kept groups (ranks average them)
        self.last_tokens = 0
        if not rows:
            return None, metrics
        x, y = padded_batch([(p + a, [0] * len(p) + [1] * len(a)) for p, a in rows], end)
        self.last_tokens = int((y != IGNORE).sum())
        n_tok = max(self.last_tokens, 1)
        lp = model.token_logprobs(x, y)  # (R, T) float64, 0 off the answers; fused head, no logits
        A = np.asarray(advs, dtype=np.float64)[:, None]
        loss = (lp * A).sum() * (-1.0 / n_tok)
        if kl_on:
            with no_grad(), self.reference() as ref:
                ref_lp = ref.token_logprobs(x, y).numpy()
            d = (lp * -1.0) + ref_lp  # log ref - log pi (0 off the answers)
            kl = (d.exp() - d - 1.0).sum() * (1.0 / n_tok)
            loss = loss + kl * self.kl_coef
            metrics["kl"] = kl.item()
        return loss, metrics
