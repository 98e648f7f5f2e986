"""One post-training stage (SFT, DPO or GRPO) from an init checkpoint to a trained one.

``run(kind, cfg)``: load the init checkpoint (a full one, or an adapter-only one, merged into
its base), add the chat tokens (growing the vocabulary if the tokenizer lacked them), wrap the
target layers in LoRA adapters if ``lora_rank`` > 0, build the stage's data and Objective, and
hand them to the same Trainer pretraining uses: same checkpoints, exact resume, log.jsonl,
loss.png, Ctrl-C handling. At the end it plots the stage's curves (``curves.png``) and, for the
built-in task, scores ``task_eval`` held-out questions (``eval.json``).

Adapter-only checkpoints: with LoRA the checkpoint's model.safetensors holds the adapters (and
any vocabulary rows the base lacks); state.json's ``"lora"`` names the base checkpoint (a full
one, by its resolved step directory) and its model file's SHA-256. ``load_policy`` loads
either kind; an adapter checkpoint given as ``--init`` to a LoRA stage is first merged and
written as a full checkpoint (``OUT/init-merged``), the new adapters' base.

Settings: one dataclass per stage (StageConfig's fields plus the stage's own), defaults, then
``--config`` TOML, then key=value overrides, checked by tinylm.train.config.validate plus the
checks here. ``--resume`` continues with the checkpoint's settings; only the keys in
tinylm.train.config.RESUMABLE may be changed.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from tinylm.posttrain import task


@dataclass
class StageConfig:
    init: str = ""                    # the checkpoint to start from (OUT/checkpoint of an earlier run)
    data: list[str] | None = None     # JSONL files; None: the built-in task (tinylm.posttrain.task)
    out_dir: str = "out-sft"
    batch_size: int = 16              # rows (SFT), pairs (DPO), prompts (GRPO) per micro-batch
    grad_accum: int = 1
    max_steps: int = 300
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 100          # validate and checkpoint every N steps
    log_interval: int = 5
    time_budget: float = 0.0          # minutes; 0: no limit
    seed: int = 1337
    keep_checkpoints: int = 1
    save_on_interrupt: bool = True
    progress: bool = True
    overflow: str = "truncate"        # longer than the context: "truncate" or "drop" (counted)
    lora_rank: int = 0                # 0: fine-tune every weight; r > 0: LoRA adapters of rank r only
    lora_alpha: float = 16.0          # adapter scale alpha / r
    lora_targets: str = "all"         # "all" Linear-like layers, or names: c_attn,c_fc,attn.c_proj
    task_train: int = 4000            # built-in task: training questions
    task_eval: int = 200              # built-in task: held-out questions scored at the end (0: none)
    eval_init: bool = True            # built-in task: score the init model first too
    # mixed precision [amp #13], as tinylm train (tinylm/amp/policy.py); LoRA's frozen base is rounded to it
    dtype: str = "fp32"               # fp32, bf16 or fp16: weights and weight gradients; fp32 masters and moments
    master_weights: bool = True       # bf16 only: false keeps no fp32 master (stochastic rounding instead)
    loss_scale_init: float = 65536.0  # fp16: the first loss scale
    loss_scale_window: int = 2000     # fp16: clean steps after which the loss scale doubles
    loss_scale_min: float = 1.0       # fp16: training stops when the loss scale would fall below this


@dataclass
class SFTConfig(StageConfig):
    packing: bool = True              # pack conversations into full rows (False: one per row, padded)
    val_every: int = 20               # --data: every Nth conversation is held out for validation


@dataclass
class DPOConfig(StageConfig):
    out_dir: str = "out-dpo"
    batch_size: int = 16
    max_steps: int = 200
    lr: float = 1e-4
    min_lr: float = 1e-5
    beta: float = 0.1                 # strength of the implicit KL to the reference
    average_logprobs: bool = False    # mean over response tokens instead of the sum
    val_every: int = 20               # every Nth pair is held out for validation
    pair_samples: int = 4             # built-in task: answers sampled per question to find wrong ones
    pair_temperature: float = 1.0


@dataclass
class GRPOConfig(StageConfig):
    out_dir: str = "out-grpo"
    batch_size: int = 8               # prompts per micro-batch
    max_steps: int = 100
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 5
    eval_interval: int = 50
    group_size: int = 8               # answers sampled per prompt
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0                    # 0: no top-k
    scale_std: bool = True            # advantage / std of the group's rewards
    kl_coef: float = 0.0              # weight of the k3 KL penalty to the reference (0: none)
    reward: str = "tinylm.posttrain.task:exact_match"   # module:function or file.py:function


CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}


def check(cfg, sources: dict | None = None, check_paths: bool = True) -> None:
    from tinylm.train.config import validate  # noqa: PLC0415

    errors = []
    try:
        validate(cfg, sources, check_paths)
    except ValueError as e:
        errors.extend(str(e).split("\n  ")[1:])
    src = lambda k: (sources or {}).get(k, "default")  # noqa: E731
    if not cfg.init:
        errors.append("init: give the checkpoint to start from (--init OUT/checkpoint)")
    if cfg.overflow not in ("truncate", "drop"):
        errors.append(f"overflow={cfg.overflow!r} ({src('overflow')}): must be truncate or drop")
    if cfg.lora_rank < 0:
        errors.append(f"lora_rank={cfg.lora_rank} ({src('lora_rank')}): must be >= 0")
    if not cfg.lora_alpha > 0:
        errors.append(f"lora_alpha={cfg.lora_alpha} ({src('lora_alpha')}): must be > 0")
    for k in ("task_train", "task_eval"):
        if getattr(cfg, k) < 0:
            errors.append(f"{k}={getattr(cfg, k)} ({src(k)}): must be >= 0")
    if hasattr(cfg, "beta") and not (math.isfinite(cfg.beta) and cfg.beta > 0):
        errors.append(f"beta={cfg.beta} ({src('beta')}): must be > 0")
    if hasattr(cfg, "group_size") and cfg.group_size < 2:
        errors.append(f"group_size={cfg.group_size} ({src('group_size')}): must be >= 2")
    if hasattr(cfg, "val_every") and cfg.val_every < 2:
        errors.append(f"val_every={cfg.val_every} ({src('val_every')}): must be >= 2")
    if errors:
        raise ValueError("invalid settings:\n  " + "\n  ".join(errors))


# ---- loading ----------------------------------------------------------------------------------
def load_policy(ckpt_dir):
    """(model, tokenizer) of a full or an adapter-only checkpoint (merged into its base, with
    plain parameter names)."""
    from tinylm.tokenizer import BPETokenizer  # noqa: PLC0415
    from tinylm.train.checkpoint import CheckpointError, _load_arrays, load_model, read_state  # noqa: PLC0415
    from tinylm.posttrain.chat import grow_vocab  # noqa: PLC0415
    from tinylm.posttrain.lora import apply_lora  # noqa: PLC0415

    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    lora = state.get("lora")
    if not lora:
        return load_model(ckpt_dir)
    base_dir = Path(lora["base"])
    base_state = read_state(base_dir)
    if base_state["sha256"].get("model.safetensors") != lora.get("base_sha256"):
        raise CheckpointError(f"{ckpt_dir / 'state.json'}: the adapters' base {base_dir} has changed since they were "
                              f"trained (its model.safetensors has another SHA-256)")
    model, _ = load_model(base_dir)
    tok = BPETokenizer.load(ckpt_dir / "tokenizer.json")
    if tok.vocab_size > model.config.vocab_size:
        grow_vocab(model, tok.vocab_size)
    wrapped = apply_lora(model, lora["rank"], lora["alpha"], lora["targets"], added_rows=lora.get("added_rows"))
    try:
        wrapped.load_state_dict(_load_arrays(ckpt_dir / "model.safetensors"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir / 'model.safetensors'}: {e.args[0] if e.args else e}") from None
    return wrapped.merged_model().eval(), tok


def _write_full(target: Path, model, tok, note: dict) -> Path:
    from tinylm.train.checkpoint import write_checkpoint_dir  # noqa: PLC0415

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint_dir(tmp, model, None, dict(note, step=0, model_type=model.model_type,
                                               model_config=model.config_dict()), tok)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def prepare_model(cfg, out: Path):
    """(policy, tokenizer, chat format, lora meta or None, the unwrapped model)."""
    from tinylm.train.checkpoint import read_state  # noqa: PLC0415
    from tinylm.posttrain.chat import ChatFormat, grow_vocab  # noqa: PLC0415
    from tinylm.posttrain.lora import apply_lora  # noqa: PLC0415

    init = Path(cfg.init).resolve()
    model, tok = load_policy(init)
    chat = ChatFormat(tok)
    added = {}
    if tok.vocab_size > model.config.vocab_size:
        old = model.config.vocab_size
        added = {n: old for n in grow_vocab(model, tok.vocab_size, seed=cfg.seed)}
        print(f"chat tokens added: vocabulary {old} -> {tok.vocab_size} ({', '.join(added)} grown)", flush=True)
    lora_meta = None
    policy = model
    if cfg.lora_rank and cfg.dtype != "fp32":
        # [amp #13] the frozen base is the working copy of a 16-bit run: its values in the format
        # (nothing trains it, so there is no master to keep); the adapters get the store's treatment
        from tinylm.amp.formats import round_model  # noqa: PLC0415

        round_model(model, cfg.dtype)
    if cfg.lora_rank:
        base = init
        if read_state(init).get("lora") or added:
            # the adapters' base must be a full checkpoint with this vocabulary: write it
            base = out / "init-merged"
            # (its added rows hold their initial values; the adapter checkpoint keeps the trained ones)
            if not (base / "state.json").exists():
                _write_full(base, model, tok, {"merged_from": str(init)})
        policy = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed, added_rows=added)
        lora_meta = dict(policy.lora_config, base=str(base),
                         base_sha256=read_state(base)["sha256"]["model.safetensors"], added_rows=added)
        n_train = sum(p.size for _, p in policy.trainable())
        rows = f" (with the added token rows of {', '.join(added)})" if added else ""
        print(f"LoRA rank {cfg.lora_rank} on {len(policy.wrapped)} layers: {n_train:,} trainable parameters{rows} of "
              f"{policy.num_params():,}", flush=True)
    policy.train()
    return policy, tok, chat, lora_meta, model


# ---- data per stage ---------------------------------------------------------------------------
def _read(cfg, parse):
    from tinylm.posttrain.data import Problems, read_jsonl  # noqa: PLC0415

    probs = Problems()
    recs = read_jsonl(cfg.data, parse, probs)
    probs.report()
    if probs.count:
        print(f"{probs.count} bad lines skipped in {', '.join(map(str, cfg.data))}", flush=True)
    return recs


def _split(items: list, every: int) -> tuple[list, list]:
    """Every ``every``-th item to validation (deterministic)."""
    return [x for i, x in enumerate(items) if i % every != every - 1], [x for i, x in enumerate(items) if i % every == every - 1]


def sft_data(cfg, model, tok, chat):
    """SFT's rendered training and validation sequences, the window T and the pad id (the same
    for one process and for several ranks, which then share the batches)."""
    from tinylm.posttrain.data import Fit, chat_record  # noqa: PLC0415
    from tinylm.posttrain.sft import sft_sequences  # noqa: PLC0415

    if cfg.data:
        train_c, val_c = _split(_read(cfg, chat_record), cfg.val_every)
    else:
        qs = task.questions("train", cfg.task_train + 200, seed=cfg.seed)
        train_c = [task.chat_example(q)["messages"] for q in qs[:cfg.task_train]]
        val_c = [task.chat_example(q)["messages"] for q in qs[cfg.task_train:]]
    T = model.config.block_size
    fit = Fit(T + 1, cfg.overflow)
    train_s = sft_sequences(chat, train_c, fit)
    val_s = sft_sequences(chat, val_c, Fit(T + 1, cfg.overflow))
    print(f"SFT data: {len(train_s)} conversations for training, {len(val_s)} for validation; "
          f"{fit.summary('conversations')}", flush=True)
    pad = tok.eot_id if tok.eot_id is not None else chat.end_id
    return train_s, val_s, T, pad


def sft_setup(cfg, model, tok, chat):
    from tinylm.posttrain.data import SFTRows, fixed_sft_batches  # noqa: PLC0415
    from tinylm.posttrain.sft import SFT, evaluate_sft  # noqa: PLC0415

    train_s, val_s, T, pad = sft_data(cfg, model, tok, chat)
    data = SFTRows(train_s, T, cfg.batch_size, cfg.seed, pad, cfg.packing)
    val = fixed_sft_batches(val_s, T, cfg.batch_size, pad, cfg.packing)
    return SFT(), data, (lambda m: evaluate_sft(m, val)) if val else None


def builtin_pairs(cfg, model, tok, chat) -> list[dict]:
    """The built-in task's preference pairs: the correct answer against the init model's own
    wrong samples (``pair_samples`` per question); a question it never gets wrong is paired with
    another question's answer of the same kind (a plausible wrong answer)."""
    from tinylm.generate import generate  # noqa: PLC0415

    qs = task.questions("train", cfg.task_train, seed=cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 3)
    K = cfg.pair_samples
    prompts = [chat.render_prompt(task.chat_messages(q)) for q in qs]
    wrong: list[list[str]] = [[] for _ in qs]
    if K > 0:
        for L, idx in task._by_length(prompts).items():
            for s in range(0, len(idx), 16):
                chunk = idx[s:s + 16]
                rows = np.array([prompts[i] for i in chunk for _ in range(K)], dtype=np.int64)
                n = min(16, model.config.block_size - L)
                out = generate(model, rows, n, temperature=cfg.pair_temperature, seed=int(rng.integers(2**31)),
                               stop_tokens=[chat.end_id])
                for r, row in enumerate(out[:, L:].tolist()):
                    i = chunk[r // K]
                    text = tok.decode(row[:row.index(chat.end_id)] if chat.end_id in row else row)
                    if not task.exact_match(qs[i], text) and text.strip() and text not in wrong[i]:
                        wrong[i].append(text)
    by_kind: dict[str, list[str]] = {}
    for q in qs:
        by_kind.setdefault(q["answer"][:1], []).append(q["answer"])
    pairs, own = [], 0
    for q, w in zip(qs, wrong):
        if w:
            rej = w[int(rng.integers(len(w)))]
            own += 1
        else:
            pool = [a for a in by_kind[q["answer"][:1]] if a != q["answer"]] or ["None"]
            rej = pool[int(rng.integers(len(pool)))]
        pairs.append({"prompt": task.chat_messages(q), "chosen": q["answer"], "rejected": rej})
    print(f"DPO pairs: {len(pairs)} questions; rejected = the init model's own wrong answer for {own}, another "
          f"question's answer for {len(pairs) - own}", flush=True)
    return pairs


def reference(cfg, policy):
    """The reference model of DPO and GRPO's KL as a context manager: with LoRA the policy with
    its adapters (and the added rows' training) switched off; else the policy itself, which at
    this point is the init model, in the run's format (``in_format``: a 16-bit run's first
    working copy is the init rounded to it, so DPO's first loss is ln 2 in every format)."""
    from tinylm.amp.formats import in_format  # noqa: PLC0415
    from tinylm.posttrain.lora import LoRAModel, disabled  # noqa: PLC0415

    return disabled(policy) if isinstance(policy, LoRAModel) else in_format(policy, cfg.dtype)


def dpo_setup(cfg, policy, tok, chat, out: Path):
    from safetensors.numpy import load_file, save_file  # noqa: PLC0415

    from tinylm.posttrain.data import Fit, preference_record  # noqa: PLC0415
    from tinylm.posttrain.dpo import DPO, PairBatches, evaluate_pairs, reference_logprobs, render_pairs  # noqa: PLC0415

    recs = _read(cfg, preference_record) if cfg.data else builtin_pairs(cfg, policy, tok, chat)
    fit = Fit(policy.config.block_size + 1, cfg.overflow)
    pairs = render_pairs(chat, recs, fit)
    print(f"DPO data: {len(pairs)} pairs; {fit.summary('sequences')}", flush=True)
    pad = tok.eot_id if tok.eot_id is not None else chat.end_id
    # the reference's log-probs: once per pair, cached in the run directory for resumes
    cache = out / "ref_logprobs.safetensors"
    key = _fingerprint(pairs, cfg)
    ref = None
    if cache.is_file():
        try:
            d = load_file(str(cache))
            if str(d["key"].tobytes().decode()) == key:
                ref = d["ref"]
        except Exception:  # noqa: BLE001 - a bad cache is recomputed
            ref = None
    if ref is None:
        from tinylm.tensor import autocast  # noqa: PLC0415

        # [amp #13] the reference runs as the policy will: activations in the run's format
        with reference(cfg, policy) as m, autocast(cfg.dtype):
            ref = reference_logprobs(m, pairs, pad, average=cfg.average_logprobs)
        save_file({"ref": ref, "key": np.frombuffer(key.encode(), dtype=np.uint8).copy()}, str(cache))
        print(f"reference log-probs computed for {len(pairs)} pairs (cached in {cache})", flush=True)
    else:
        print(f"reference log-probs read from {cache}", flush=True)
    idx = list(range(len(pairs)))
    tr, va = _split(idx, cfg.val_every)
    data = PairBatches([pairs[i] for i in tr], ref[tr], cfg.batch_size, cfg.seed, pad)
    vp, vr = [pairs[i] for i in va], ref[va]
    ev = (lambda m: evaluate_pairs(m, vp, vr, cfg.beta, pad, cfg.average_logprobs)) if vp else None
    return DPO(cfg.beta, cfg.average_logprobs), data, ev


def _fingerprint(pairs, cfg) -> str:
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    key = [cfg.init, cfg.average_logprobs, cfg.dtype, cfg.lora_rank]
    if cfg.dtype != "fp32":  # [amp #13] computed with 16-bit activations since: older 16-bit caches are stale
        key.append("16-bit activations")
    h.update(json.dumps(key).encode())
    for p in pairs:
        h.update(json.dumps([p["chosen"][0], p["chosen"][1], p["rejected"][0], p["rejected"][1]]).encode())
    return h.hexdigest()


def grpo_setup(cfg, policy, tok, chat, out: Path, ranks: int = 1):
    """(objective, prompt batches, None); ``ranks``: the batches are global, ranks x batch_size
    prompts (tinylm/distributed/posttrain.py gives each rank its share)."""
    import contextlib  # noqa: PLC0415

    from tinylm.posttrain.data import prompt_record  # noqa: PLC0415
    from tinylm.posttrain.grpo import GRPO, PromptBatches, load_reward  # noqa: PLC0415
    from tinylm.posttrain.lora import LoRAModel, disabled  # noqa: PLC0415

    if cfg.data:
        recs = _read(cfg, prompt_record)
    else:
        recs = [{"prompt": task.chat_messages(q), "answer": q["answer"]}
                for q in task.questions("train", cfg.task_train, seed=cfg.seed + 4)]
    reward = load_reward(cfg.reward)
    reference = None
    if cfg.kl_coef > 0:
        if isinstance(policy, LoRAModel):
            reference = lambda: disabled(policy)  # noqa: E731
        else:
            ref_model, _ = load_policy(Path(cfg.init).resolve())
            from tinylm.posttrain.chat import grow_vocab  # noqa: PLC0415

            if ref_model.config.vocab_size < policy.config.vocab_size:
                grow_vocab(ref_model, policy.config.vocab_size, seed=cfg.seed)
            for p in ref_model.parameters():
                p.requires_grad = False
            from tinylm.amp.formats import round_model  # noqa: PLC0415

            round_model(ref_model, cfg.dtype)  # [amp #13] the init in the run's format
            reference = lambda: contextlib.nullcontext(ref_model)  # noqa: E731
    print(f"GRPO: {len(recs)} prompts, {cfg.group_size} answers each, reward {cfg.reward}", flush=True)
    obj = GRPO(chat, reward, cfg.group_size, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.scale_std,
               cfg.kl_coef, reference, seed=cfg.seed)
    if ranks > 1 and len(recs) < cfg.batch_size * ranks:
        raise ValueError(f"{len(recs)} prompts, fewer than one global batch of {cfg.batch_size} x {ranks} ranks")
    data = PromptBatches(recs, cfg.batch_size * ranks, cfg.seed)
    data.tokens_per_batch = cfg.batch_size * ranks * cfg.group_size * cfg.max_new_tokens
    return obj, data, None


# ---- curves -----------------------------------------------------------------------------------
CURVES = {"sft": ["loss"], "dpo": ["loss", "reward_margin", "reward_accuracy"], "grpo": ["loss", "reward"]}


def plot_curves(log_path: Path, keys: list[str], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    recs = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=110)
    axes = np.atleast_1d(axes)
    for ax, k in zip(axes, keys):
        pts = [(r["step"], r[k]) for r in recs if k in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.2)
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if k == "loss" and val:
            ax.plot(*zip(*val), "o-", ms=3, label="validation")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


# ---- the stage --------------------------------------------------------------------------------
def _reconcile(cfg, saved: dict, sources: dict | None):
    from tinylm.train.config import RESUMABLE  # noqa: PLC0415

    known = {f.name for f in fields(cfg)}
    base = type(cfg)(**{k: v for k, v in saved.items() if k in known})
    given = {k for k, s in (sources or {}).items() if s != "default"}
    frozen = [f"{k}: checkpoint {getattr(base, k)!r}, given {getattr(cfg, k)!r}" for k in sorted(given)
              if k not in RESUMABLE and k not in ("init",) and getattr(cfg, k) != getattr(base, k)]
    if frozen:
        raise ValueError("--resume: these settings cannot change in the middle of a run:\n  " + "\n  ".join(frozen))
    return type(cfg)(**{**asdict(base), **{k: getattr(cfg, k) for k in given if k in RESUMABLE}})


def resume_state(out: Path, kind: str) -> dict:
    """The checkpoint a resumed ``kind`` stage continues (an error if there is none or it is
    another stage's)."""
    from tinylm.train.checkpoint import load_checkpoint  # noqa: PLC0415

    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {out} (expected {ckpt})")
    state = load_checkpoint(ckpt)
    if state.get("stage") != kind:
        raise ValueError(f"--resume: {ckpt} is a {state.get('stage', 'pretraining')} checkpoint, not {kind}")
    return state


def holds_run(out: Path) -> bool:
    return (out / "checkpoint").exists() or (out / "log.jsonl").is_file()


def refuse_other_run(out: Path):
    return ValueError(f"{out} holds another run; pass --resume to continue it, --overwrite to replace it, "
                      f"or --out DIR")


def clear_run(out: Path) -> None:
    """--overwrite: remove the run in ``out`` (its checkpoints, log, curves, caches)."""
    link = out / "checkpoint"
    if link.is_symlink() or link.is_file():
        link.unlink()
    for name in ("checkpoints", "init-merged"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("log.jsonl", "loss.png", "curves.png", "eval.json", "ref_logprobs.safetensors"):
        (out / name).unlink(missing_ok=True)


def eval_before(kind: str, cfg, policy, tok, chat) -> dict:
    """The init model's held-out accuracy on the built-in task (few-shot too, for SFT)."""
    results = {}
    qs = task.questions("test", cfg.task_eval, seed=0)
    policy.eval()
    if kind == "sft":
        r = task.accuracy(policy, tok, qs, mode="base")
        results["init_prompted"] = r["accuracy"]
        print(f"init model, few-shot REPL prompt: held-out accuracy {r['accuracy']:.1%} ({r['n']} questions)",
              flush=True)
    r = task.accuracy(policy, tok, qs, mode="chat", chat=chat)
    results["init_chat"] = r["accuracy"]
    print(f"init model, chat prompt: held-out accuracy {r['accuracy']:.1%} ({r['n']} questions)", flush=True)
    policy.train()
    return results


def eval_after(kind: str, cfg, policy, tok, chat, results: dict, out: Path, write: bool = True) -> None:
    """The trained model's held-out accuracy, added to ``results``; ``write``: OUT/eval.json."""
    policy.eval()
    r = task.accuracy(policy, tok, task.questions("test", cfg.task_eval, seed=0), mode="chat", chat=chat)
    results["final_chat"] = r["accuracy"]
    print(f"after {kind}: held-out accuracy {r['accuracy']:.1%} ({r['n']} questions)", flush=True)
    if write:
        (out / "eval.json").write_text(json.dumps(dict(results, examples=r["examples"][:50]), indent=1))


def meta_of(cfg, kind: str, lora_meta):
    """The Trainer's ``meta``: what state.json records of a post-training stage."""

    def meta():
        m = {"train_config": asdict(cfg), "stage": kind, "init": str(Path(cfg.init).resolve())}
        if lora_meta is not None:
            m["lora"] = lora_meta
        return m

    return meta


def run(kind: str, cfg, resume: bool = False, overwrite: bool = False, sources: dict | None = None,
        max_steps: int | None = None) -> dict:
    from tinylm.train.checkpoint import clean_stale  # noqa: PLC0415
    from tinylm.train.loop import Trainer, cut_log  # noqa: PLC0415

    out = Path(cfg.out_dir)
    state = None
    if resume:
        state = resume_state(out, kind)
        cfg = _reconcile(cfg, state["train_config"], sources)
    check(cfg, sources, check_paths=not resume)
    out.mkdir(parents=True, exist_ok=True)
    for line in clean_stale(out):
        print(line, flush=True)
    if not resume and holds_run(out):
        if not overwrite:
            raise refuse_other_run(out)
        clear_run(out)

    policy, tok, chat, lora_meta, model = prepare_model(cfg, out)
    results = {}
    builtin = not cfg.data
    if builtin and cfg.eval_init and cfg.task_eval and state is None:
        results = eval_before(kind, cfg, policy, tok, chat)

    if kind == "sft":
        obj, data, ev = sft_setup(cfg, policy, tok, chat)
    elif kind == "dpo":
        obj, data, ev = dpo_setup(cfg, policy, tok, chat, out)
    elif kind == "grpo":
        obj, data, ev = grpo_setup(cfg, policy, tok, chat, out)
    else:
        raise ValueError(f"unknown stage {kind!r}")

    trainer = Trainer(policy, obj, data, cfg, out, tok, ev, meta_of(cfg, kind, lora_meta))
    if state is not None:
        trainer.restore(state)
        cut_log(out / "log.jsonl", trainer.step)
    n_train = trainer.store.numel()
    print(f"{kind}: {n_train:,} trainable parameters; {cfg.max_steps} steps of {cfg.batch_size} x "
          f"{cfg.grad_accum}", flush=True)
    summary = trainer.run(max_steps)
    if (out / "log.jsonl").is_file():
        plot_curves(out / "log.jsonl", CURVES[kind], out / "curves.png", f"tinylm {kind}")
    if builtin and cfg.task_eval and summary["stopped"] != "interrupted":
        eval_after(kind, cfg, policy, tok, chat, results, out)
    summary["results"] = results
    return summary
