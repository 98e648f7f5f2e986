"""Issue #16 (reliability): each reported defect of training, checkpoints and the CLI,
reproduced as it was reported, plus a fuzz test of checkpoint loading and a crash test that
SIGKILLs a training run at random instants and resumes it to the same losses.

Every run is tiny (vocabulary 300, one layer, 16 wide) and writes only under tmp_path. The
data defects (gzip, JSONL, binary files, splits, empty directories, the token cache, memory)
are tested in tests/test_corpus.py."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import tinylm
from tinylm._files import sha256_file
from tinylm.cli import main
from tinylm.train import CheckpointError, TrainConfig, load_checkpoint, train
from tinylm.train import checkpoint as ckmod
from tinylm.train import pretrain

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog and cat runs to a red house while birds sing".split()

# the tiny model and run, as key=value overrides (CLI) and as a TrainConfig
TINY = dict(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, warmup_steps=2,
            eval_interval=3, eval_batches=1, log_interval=1, lr=1e-2, min_lr=1e-3, sample_tokens=0)
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()] + ["--no-progress"]


def make_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS, 12)) + "." for _ in range(12))
        (path / f"doc{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return path


def tiny_cfg(data, out, **kw) -> TrainConfig:
    return replace(TrainConfig(data=[str(data)], out_dir=str(out), progress=False, **TINY), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """One tiny run, 6 steps of a 9-step schedule (checkpoint at step 6): copy it, never edit it."""
    out = tmp_path_factory.mktemp("base") / "run"
    res = train(tiny_cfg(corpus, out, max_steps=9), max_steps=6)
    assert res["steps"] == 6
    return out


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the base run (its checkpoint link is relative, so it follows)."""
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst, symlinks=True)
    return dst


def cli(capsys, *argv):
    """``tinylm ARGV`` in this process -> (exit code, stdout, stderr). An exception other than
    the user errors main() prints as one line propagates, failing the test with its traceback."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def edit_state(ck: Path, fn) -> None:
    p = ck / "state.json"
    state = json.loads(p.read_text())
    fn(state)
    p.write_text(json.dumps(state))


def rehash(ck: Path) -> None:
    """Make state.json's checksums match the files again (a hand edit that "fixed" the hash)."""
    edit_state(ck, lambda s: s["sha256"].update({f: sha256_file(ck / f) for f in ckmod.FILES}))


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_records(out) if "loss" in r}


# ---- loading checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("fname", ["model.safetensors", "optimizer.safetensors"])
def test_a_missing_tensor_is_a_one_line_error_from_sample_and_resume(run, capsys, fname):
    """A tensor removed from a safetensors file whose hash was updated in state.json: was a
    KeyError traceback from `tinylm sample` and `tinylm train --resume`."""
    from safetensors.numpy import load_file, save_file

    ck = run / "checkpoint"
    arrays = load_file(str(ck / fname))
    gone = sorted(arrays)[0]
    del arrays[gone]
    save_file(arrays, str(ck / fname))
    rehash(ck)
    if fname == "model.safetensors":
        with pytest.raises(CheckpointError, match=fname):
            tinylm.load(ck)
    with pytest.raises(CheckpointError, match=fname):
        train(TrainConfig(out_dir=str(run)), resume=True, sources={})
    if fname == "model.safetensors":
        rc, out, err = cli(capsys, "sample", "--ckpt", ck, "--max-new-tokens", 3)
        one_line_error(rc, err, fname)
        assert out == ""
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    one_line_error(rc, err, fname)


@pytest.mark.parametrize("edit, why", [
    (lambda s: s.pop("sampler"), "'sampler'"),
    (lambda s: s.pop("train_config"), "'train_config'"),
    (lambda s: s.update(step="ten"), "'step'"),
    (lambda s: s.update(step=-5), "'step'"),
    (lambda s: s.update(step=6.0), "'step'"),
    (lambda s: s.update(step=True), "'step'"),
    (lambda s: s.update(history={"a": 1}), "'history'"),
    (lambda s: s.update(sampler={"bit_generator": "nope"}), "state.json"),
    (lambda s: s.update(schedule="cosine"), "state.json"),
    (lambda s: s["train_config"].update(n_embd="wide"), "n_embd"),
    (lambda s: s["train_config"].update(data=[1, 2]), "data"),
    (lambda s: s["train_config"].pop("lr"), "train_config has no 'lr'"),
    (lambda s: s.update(train_config={}), "train_config has no"),
], ids=["no-sampler", "no-train_config", "step-ten", "step-minus-5", "step-float", "step-bool", "history-dict",
        "bad-sampler", "bad-schedule", "train_config-n_embd-str", "train_config-data-ints",
        "train_config-no-lr", "train_config-empty"])
def test_a_valid_json_state_with_missing_or_wrong_fields_is_a_one_line_error_on_resume(run, capsys, edit, why):
    """state.json that is JSON but lacks `sampler` or `train_config`, or has "step": "ten":
    were tracebacks; "step": -5 was accepted."""
    ck = run / "checkpoint"
    edit_state(ck, edit)
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    one_line_error(rc, err, "state.json", why)
    assert "trained" not in out


def test_a_key_an_older_checkpoint_lacks_takes_the_default_and_says_so(run, capsys):
    edit_state(run / "checkpoint", lambda s: s["train_config"].pop("keep_checkpoints"))
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    assert rc == 0, err
    assert "train_config has no 'keep_checkpoints'" in out and "now at step 9" in out


@pytest.mark.parametrize("edit, ok", [
    (lambda s: s.pop("sampler"), True),            # sampling needs no training state
    (lambda s: s.pop("train_config"), True),
    (lambda s: s.update(step="ten"), False),
    (lambda s: s.update(step=-5), False),
    (lambda s: s.pop("model_config"), False),
    (lambda s: s["model_config"].update(n_embd=-16), False),
    (lambda s: s["model_config"].update(n_head="two"), False),
    (lambda s: s.update(model_type="bert"), False),
], ids=["no-sampler", "no-train_config", "step-ten", "step-minus-5", "no-model_config", "n_embd-negative",
        "n_head-str", "model_type-unknown"])
def test_sample_reads_what_it_needs_and_names_state_json_otherwise(run, capsys, edit, ok):
    ck = run / "checkpoint"
    edit_state(ck, edit)
    rc, out, err = cli(capsys, "sample", "--ckpt", ck, "--max-new-tokens", 3, "--seed", 0, "--prompt", "the")
    if ok:
        assert rc == 0 and out.startswith("the"), err
    else:
        one_line_error(rc, err, "state.json")
        assert out == ""


# ---- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("eval_interval=0", "eval_interval=0 (override): must be >= 1"),
    ("log_interval=0", "log_interval=0 (override): must be >= 1"),
    ("eval_batches=0", "eval_batches=0 (override): must be >= 1"),
    ("batch_size=0", "batch_size=0 (override): must be >= 1"),
    ("batch_size=-4", "batch_size=-4 (override): must be >= 1"),
    ("seed=-1", "seed=-1 (override): must be >= 0"),
    ("grad_accum=0", "grad_accum=0 (override): must be >= 1"),
    ("n_embd=18", "n_embd=18 (override): must be divisible by n_head=4"),
    ("n_head=5", "must be divisible by n_head=5"),
    ("model=llama n_embd=12", "n_embd / n_head = 3 must be even for RoPE"),
    ("model=llama n_kv_head=3", "n_kv_head=3 (override): must divide n_head"),
    ("vocab_size=100", "vocab_size=100 (override): must be >= 257"),
    ("lr=nan", "lr=nan (override)"),
], ids=lambda x: x.split(" ")[0] if "=" in x else None)
def test_bad_settings_are_reported_before_any_work_naming_key_value_and_source(corpus, tmp_path, capsys, override,
                                                                               message):
    """eval_interval=0 / log_interval=0 / eval_batches=0 ended in ZeroDivisionError; batch_size
    0 or -4 and seed=-1 gave errors that did not name the key; grad_accum=0 "trained" with loss
    0.0 and exit 0; n_embd % n_head was reported only after a tokenizer had been trained."""
    out = tmp_path / "out"
    values = {**TINY, "n_head": 4, "n_embd": 16, **dict(o.split("=") for o in override.split())}
    rc, stdout, err = cli(capsys, "train", "--data", corpus, "--out", out, "--no-progress",
                          *[f"{k}={v}" for k, v in values.items()])
    one_line_error(rc, err, message)
    assert "trained" not in stdout and not (out / "data").exists()  # no tokenizer, no token cache


def test_all_bad_settings_are_listed_at_once(corpus, tmp_path, capsys):
    rc, _, err = cli(capsys, "train", "--data", corpus, "--out", tmp_path / "o", "eval_interval=0", "batch_size=-4",
                     "seed=-1", "--max-steps", "0")
    one_line_error(rc, err, "eval_interval=0", "batch_size=-4", "seed=-1", "max_steps=0 (command line)")


def test_max_steps_0_is_an_error_and_prints_no_paths(corpus, tmp_path, capsys):
    """--max-steps 0 exited 0 and printed a checkpoint and a loss-curve path that did not exist."""
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "train", "--data", corpus, "--out", out, "--max-steps", 0, *TINY_ARGS)
    one_line_error(rc, err, "max_steps=0 (command line): must be >= 1")
    assert "checkpoint" not in stdout and "loss.png" not in stdout
    assert not (out / "checkpoint").exists()


# ---- output directories and resuming --------------------------------------------------------

def snapshot(out: Path) -> dict:
    """Every file under ``out`` (links as their target) -> its bytes."""
    snap = {}
    for p in sorted(out.rglob("*")):
        if p.is_symlink():
            snap[str(p.relative_to(out))] = os.readlink(p)
        elif p.is_file():
            snap[str(p.relative_to(out))] = p.read_bytes()
    return snap


def test_training_into_a_directory_with_another_run_is_refused_without_resume_or_overwrite(run, corpus, capsys):
    """It overwrote the other run's checkpoint and truncated its log.jsonl without a word."""
    before = snapshot(run)
    rc, out, err = cli(capsys, "train", "--data", corpus, "--out", run, "--max-steps", 3, *TINY_ARGS)
    one_line_error(rc, err, "holds another run", "--resume", "--overwrite")
    assert snapshot(run) == before
    rc, out, err = cli(capsys, "train", "--data", corpus, "--out", run, "--max-steps", 3, "--overwrite", *TINY_ARGS)
    assert rc == 0, err
    assert [r["step"] for r in log_records(run) if "loss" in r] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoint")["step"] == 3
    assert len(list((run / "checkpoints").iterdir())) == 1


def test_resume_with_changed_settings_is_an_error_listing_every_one(run, capsys):
    """--resume silently ignored changed settings (n_embd, lr, batch_size)."""
    before = snapshot(run)
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "n_embd=32", "lr=0.001", "batch_size=8",
                       "log_interval=2", "--no-progress")
    one_line_error(rc, err, "cannot change", "n_embd: checkpoint 16, given 32", "lr: checkpoint 0.01, given 0.001",
                   "batch_size: checkpoint 4, given 8")
    assert "log_interval" not in err  # that one may change
    assert snapshot(run) == before
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "log_interval=2", "n_embd=16", "--no-progress")
    assert rc == 0, err
    assert "resume: log_interval 1 -> 2" in out


def test_a_relative_data_path_resumes_from_another_working_directory(corpus, tmp_path, monkeypatch, capsys):
    """A relative --data stored in the checkpoint beat the flag, so a run resumed only from its
    original working directory. Also: the resume reuses the token cache (no second one)."""
    a, b = tmp_path / "A", tmp_path / "B"
    shutil.copytree(corpus, a / "text")
    b.mkdir()
    out = tmp_path / "run"
    monkeypatch.chdir(a)
    train(tiny_cfg("text", out, max_steps=9), max_steps=5, sources={"data": "command line"})
    assert load_checkpoint(out / "checkpoint")["train_config"]["data"] == [str((a / "text").resolve())]
    caches = sorted((out / "data").iterdir())
    monkeypatch.chdir(b)
    # the same files through a path relative to B: the same data, not a changed setting
    rc, stdout, err = cli(capsys, "train", "--resume", "--out", out, "--data", "../A/text", "--max-steps", 7,
                          "--no-progress")
    assert rc == 0, err
    assert "now at step 7" in stdout
    rc, stdout, err = cli(capsys, "train", "--resume", "--out", out, "--no-progress")  # no --data at all
    assert rc == 0, err
    assert "now at step 9" in stdout
    assert sorted((out / "data").iterdir()) == caches
    assert sorted(train_losses(out)) == list(range(1, 10))
    # other files under another relative path are a different data set: refused
    shutil.copytree(a / "text", b / "text")
    (b / "text" / "doc000.txt").write_text("other text\n")
    rc, stdout, err = cli(capsys, "train", "--resume", "--out", out, "--data", "text", "--max-steps", 12, "--extend",
                          "--no-progress")
    one_line_error(rc, err, "data: checkpoint")


def test_after_a_resume_the_log_holds_each_step_once(run, capsys):
    """log.jsonl repeated the steps between the checkpoint and the kill."""
    with open(run / "log.jsonl", "a") as f:  # what a run killed at step 8, after its step-6 checkpoint, left
        f.write(json.dumps({"step": 7, "loss": 9.0}) + "\n" + json.dumps({"step": 8, "loss": 9.0}) + "\n")
        f.write('{"step": 9, "lo')  # cut short by the kill
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    assert rc == 0, err
    assert "log.jsonl cut back to step 6 (3 later lines dropped)" in out
    steps = [r["step"] for r in log_records(run) if "loss" in r]
    assert steps == list(range(1, 10))
    assert 9.0 not in train_losses(run).values()


def lrs(out: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in log_records(out) if "lr" in r}


def test_extend_continues_the_cosine_from_the_current_lr(run, capsys):
    """The README's `tinylm train --resume --max-steps 3000` restarted the cosine schedule (the
    lr jumped up); now a longer schedule needs --extend, which continues from the lr reached."""
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--max-steps", 20, "--no-progress")
    one_line_error(rc, err, "schedule ends at step 9", "--extend")
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--max-steps", 20, "--extend", "--no-progress")
    assert rc == 0, err
    lr = lrs(run)
    assert sorted(lr) == list(range(1, 21))
    # lr[k] is the lr step k was trained with (schedule(k - 1)); the checkpoint is at step 6
    from tinylm.optim import Schedule

    planned = Schedule(TINY["lr"], TINY["min_lr"], TINY["warmup_steps"], 9)
    assert lr[7] == pytest.approx(planned(6), rel=1e-12)     # continuous: where the first run was
    assert max(lr[k] for k in range(7, 21)) == lr[7]         # never back up (a restart jumped to ~lr)
    assert lr[7] - lr[8] < planned(6) - planned(7)           # and slower, over the longer run
    assert lr[20] == pytest.approx(TINY["min_lr"], rel=0.05)
    planned.extend(6, 20)
    assert [lr[k] for k in range(1, 21)] == pytest.approx([planned(k - 1) for k in range(1, 21)], rel=1e-12)
    assert load_checkpoint(run / "checkpoint")["train_config"]["max_steps"] == 20


@pytest.mark.parametrize("finished", [False, True])
def test_resume_with_nothing_left_to_train_is_an_error(run, capsys, finished):
    """`--resume --max-steps 50` on a step-120 checkpoint printed "trained 120 steps in 0.0 min"."""
    if finished:
        rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
        assert rc == 0 and "now at step 9" in out, err
    before = snapshot(run)
    step = 9 if finished else 6
    for extra in ([], ["--max-steps", 5], ["--max-steps", step]):
        if finished and not extra:
            rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
        elif not extra:
            continue
        else:
            rc, out, err = cli(capsys, "train", "--resume", "--out", run, *extra, "--no-progress")
        one_line_error(rc, err, f"at step {step}", "nothing")
        assert "trained" not in out
    assert snapshot(run) == before


# ---- checkpoint durability -------------------------------------------------------------------

class _Opt:
    """What save_checkpoint needs of an optimizer: its arrays."""

    def __init__(self, arrays):
        self.arrays = arrays

    def state_dict(self):
        return self.arrays


def save_inputs(link: Path):
    """(model, optimizer, meta, tokenizer) that save_checkpoint would get for this checkpoint."""
    model, tok = tinylm.load(link)
    state = load_checkpoint(link)
    opt = _Opt(state.pop("optimizer"))
    state.pop("model")
    meta = {k: v for k, v in state.items() if k not in ("sha256", "format_version")}
    return model, opt, meta, tok


class Crash(Exception):
    pass


CRASH_POINTS = ("rename", "replace", "symlink", "fsync")


def test_a_crash_at_any_point_of_a_save_leaves_the_old_or_the_new_checkpoint(run, monkeypatch):
    """A kill between the renames left no checkpoint under its name. Each os.rename, os.replace,
    os.symlink and os.fsync of a save in turn raises (a crash at that instant): out/checkpoint
    must then load as the step before or the step being saved."""
    link = run / "checkpoint"
    model, opt, meta, tok = save_inputs(link)
    real = {name: getattr(os, name) for name in CRASH_POINTS}
    prev, outcomes = 6, []
    for at in range(100):
        count = [0]

        def make(name):
            def f(*a, **k):
                count[0] += 1
                if count[0] == at + 1:
                    raise Crash(name)
                return real[name](*a, **k)
            return f

        step = 100 + at
        for name in CRASH_POINTS:
            monkeypatch.setattr(os, name, make(name))
        try:
            ckmod.save_checkpoint(link, model, opt, dict(meta, step=step), tok)
            crashed = None
        except Crash as e:
            crashed = str(e)
        finally:
            for name in CRASH_POINTS:
                monkeypatch.setattr(os, name, real[name])
        got = load_checkpoint(link)["step"]
        assert got in (prev, step), (at, crashed)
        tinylm.load(link)
        outcomes.append((crashed, got == step))
        prev = got
        if crashed is None:
            break
    assert outcomes[-1] == (None, True)
    assert len(outcomes) >= 10, outcomes   # 4 files, state.json, 2 dirs fsync'd, 2 renames, a link
    assert any(new for _, new in outcomes[:-1])  # a crash after the switch (e.g. in the last fsync) keeps the new
    ckmod.save_checkpoint(link, model, opt, dict(meta, step=500), tok)   # and the next save tidies up
    assert [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" not in p.name] == ["step-0000500"]


def test_a_save_fsyncs_every_file_and_directory_before_the_switch(run, monkeypatch):
    link = run / "checkpoint"
    model, opt, meta, tok = save_inputs(link)
    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", os.fspath(dst)))
        return real_rename(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    final = ckmod.save_checkpoint(link, model, opt, dict(meta, step=7), tok)
    monkeypatch.undo()
    at = {e: i for i, e in enumerate(events)}   # the last index of each event
    tmp = os.path.realpath(final) + f".tmp-{os.getpid()}"
    dir_renamed = at[("rename", str(final))]
    switched = at[("replace", str(link))]
    for name in (*ckmod.FILES, "state.json"):
        assert at[("fsync", f"{tmp}/{name}")] < dir_renamed, (name, events)
    assert at[("fsync", tmp)] < dir_renamed                                   # the new directory's entries
    assert dir_renamed < at[("fsync", os.path.realpath(run / "checkpoints"))] < switched   # its name
    assert at[("fsync", str(run.resolve()))] > switched                       # the link's new target
    assert load_checkpoint(link)["step"] == 7


KILLED_SAVE = r'''
import os, signal, sys
from pathlib import Path
import tinylm
from tinylm.train import checkpoint as ck

link, op, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
model, tok = tinylm.load(link)
state = ck.load_checkpoint(link)
arrays = state.pop("optimizer"); state.pop("model")
opt = type("Opt", (), {"state_dict": lambda self: arrays})()
real, n = getattr(os, op), [0]
def dying(*a, **k):
    n[0] += 1
    if n[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(os, op, dying)
ck.save_checkpoint(link, model, opt, dict(state, step=7), tok)
'''


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_save_are_removed_by_the_next_run_with_a_line_each(run, capsys):
    """Temporary directories of interrupted writes stayed forever."""
    link = run / "checkpoint"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for op, nth in (("fsync", 2), ("replace", 2)):  # mid-write; just before the link switch
        r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(link), op, str(nth)], env=env, timeout=300,
                           capture_output=True, text=True)
        assert r.returncode == -signal.SIGKILL, r.stderr
    left = [p for p in [*(run / "checkpoints").iterdir(), *run.iterdir()] if ".tmp-" in p.name or ".new-" in p.name]
    assert len(left) == 2, left  # step-0000007.tmp-PID/ (the first) and checkpoint.new-PID (the second)
    for name in ("loss.tmp-{}.png", "log.jsonl.tmp-{}"):  # a plot or a log cut killed half-way
        left.append(run / name.format(dead_pid()))
        left[-1].write_bytes(b"x" * 10)
    assert load_checkpoint(link)["step"] == 6
    rc, out, err = cli(capsys, "train", "--resume", "--out", run, "--no-progress")
    assert rc == 0, err
    for p in left:
        assert not p.exists() and not p.is_symlink()
        assert f"removed {p}" in out
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name or ".new-" in p.name]


# ---- smaller ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--num-samples", 0], "--num-samples must be >= 1"),
    (["--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
    (["--temperature", -1], "temperature"),
    (["--top-k", 0], "top_k"),
    (["--top-p", 1.5], "top_p"),
], ids=["num-samples-0", "max-new-tokens-0", "temperature--1", "top-k-0", "top-p-1.5"])
def test_sample_flags_are_checked_before_anything_is_printed(base_run, capsys, flags, message):
    """--num-samples 0 printed nothing with exit 0; --temperature -1 echoed the prompt before its error."""
    rc, out, err = cli(capsys, "sample", "--ckpt", base_run / "checkpoint", "--prompt", "hello", *flags)
    one_line_error(rc, err, message)
    assert out == ""


def test_overrides_may_stand_anywhere_even_after_data_with_several_paths(corpus, tmp_path, capsys):
    """Overrides had to be contiguous: `--data a b n_layer=1` read n_layer=1 as a data path."""
    a, b = tmp_path / "a", tmp_path / "b"
    docs = sorted(corpus.iterdir())
    for d, part in ((a, docs[:20]), (b, docs[20:])):
        d.mkdir()
        for f in part:
            shutil.copy(f, d)
    args = [a for a in TINY_ARGS if not a.startswith(("n_layer=", "vocab_size="))]
    rc, out, err = cli(capsys, "train", "vocab_size=300", "--data", a, b, "n_layer=1", "--out", tmp_path / "o",
                       "--max-steps", 2, *args[:3], "--no-progress", *args[3:])
    assert rc == 0, err
    tc = load_checkpoint(tmp_path / "o" / "checkpoint")["train_config"]
    assert tc["data"] == [str(a.resolve()), str(b.resolve())]
    assert (tc["n_layer"], tc["vocab_size"], tc["max_steps"]) == (1, 300, 2)


def test_data_problems_are_one_line_errors_that_say_what_is_wrong(tmp_path, capsys):
    """An existing empty directory was "no such file" (the rest: tests/test_corpus.py)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    for data, message in (("empty", "the directory contains no files"), ("empty.txt", "0 tokens found"),
                          ("missing", "missing: no such file or directory")):
        rc, out, err = cli(capsys, "train", "--data", tmp_path / data, "--out", tmp_path / "o", *TINY_ARGS)
        one_line_error(rc, err, message)
        assert ".tmp" not in err


def test_errors_do_not_name_temporary_files(tmp_path, capsys):
    """An error named a temporary file (tok.json.tmp1234) instead of the file asked for."""
    (tmp_path / "t.txt").write_text("hello world, hello there\n" * 20)
    rc, out, err = cli(capsys, "tokenizer", "train", "--data", tmp_path / "t.txt", "--vocab-size", 260, "--out",
                       tmp_path / "nodir" / "tok.json", "--no-progress")
    one_line_error(rc, err, str(tmp_path / "nodir" / "tok.json"))
    assert ".tmp" not in err


def test_every_train_and_sample_flag_has_help():
    """Most sample and train flags had no help text."""
    import argparse

    from tinylm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "sample"):
        for action in sub.choices[name]._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)


def test_with_a_time_budget_the_bar_and_summary_end_at_the_last_step(corpus, tmp_path, capsys):
    """With --time-budget the progress bar ended at 3% of 100,000 steps."""
    args = [a for a in TINY_ARGS if a != "--no-progress"] + ["eval_interval=1000", "max_steps=100000"]
    rc, out, err = cli(capsys, "train", "--data", corpus, "--out", tmp_path / "o", "--time-budget", 0.03, *args)
    assert rc == 0, err
    step = load_checkpoint(tmp_path / "o" / "checkpoint")["step"]
    assert 1 <= step < 100000
    bars = [line for line in err.replace("\r", "\n").splitlines() if "step/s" in line or "s/step" in line]
    assert bars and f"{step}/{step}" in bars[-1] and "100%" in bars[-1], bars[-3:]
    assert f"now at step {step}" in out and "time budget spent" in out


STEPS = 36  # the interrupted runs' length


def start_training(corpus, out, *extra, max_steps=STEPS):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tinylm", "train", "--data", str(corpus), "--out", str(out),
                             "--max-steps", str(max_steps), *TINY_ARGS, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(cond, proc, timeout=300.0, poll=0.002):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            raise TimeoutError
        time.sleep(poll)
    return True


def link_target(out: Path):
    try:
        return os.readlink(out / "checkpoint")
    except OSError:
        return None


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """A straight run by the CLI: its log's losses and history (what interrupted runs must end with)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    p = start_training(corpus, out)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    return train_losses(out), load_checkpoint(out / "checkpoint")["history"]


def start_resume(out: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tinylm", "train", "--resume", "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def resume_to_end(out: Path):
    p = start_resume(out)
    stdout, stderr = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_says_which_checkpoint_is_kept_and_the_run_resumes_exactly(corpus, tmp_path, straight, presses):
    """Ctrl-C said "interrupted" without saying which checkpoint was kept. Once: the step in
    flight finishes and is saved; twice: stop at once, keeping the last checkpoint."""
    out = tmp_path / "run"
    p = start_training(corpus, out)
    assert wait_for(lambda: link_target(out) is not None, p)
    for _ in range(presses):
        p.send_signal(signal.SIGINT)
        time.sleep(0.005)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr
    kept = load_checkpoint(out / "checkpoint")["step"]
    assert f"step {kept}" in (stdout + stderr).split("interrupt", 1)[-1], (stdout, stderr)
    assert "Traceback" not in stderr
    r = resume_to_end(out)
    assert r.returncode == 0, r.stderr
    losses, history = straight
    assert train_losses(out) == losses
    assert load_checkpoint(out / "checkpoint")["history"] == history


# ---- fuzz: a mutated checkpoint loads or is a CheckpointError naming its file ------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6)


def mutate_json(data, obj, depth=0):
    """Delete, replace or add one entry somewhere inside ``obj`` (a dict or list), in place."""
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    if not keys or data.draw(st.sampled_from(["change"] * 9 + ["add"])) == "add":
        if isinstance(obj, dict):
            obj[data.draw(st.text(max_size=6))] = data.draw(json_values)
        else:
            obj.append(data.draw(json_values))
        return
    k = data.draw(st.sampled_from(keys))
    if isinstance(obj[k], (dict, list)) and obj[k] and depth < 3 and data.draw(st.booleans()):
        return mutate_json(data, obj[k], depth + 1)
    if data.draw(st.booleans()):
        del obj[k]
    else:
        obj[k] = data.draw(json_values | st.integers(-3, 300))


def mutate_safetensors(data, path: Path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    kind = data.draw(st.sampled_from(["header", "header", "length", "bytes", "truncate"]))
    if kind == "header":
        header = json.loads(raw[8:8 + n])
        mutate_json(data, header)
        body = json.dumps(header).encode()
        raw = len(body).to_bytes(8, "little") + body + raw[8 + n:]
    elif kind == "length":
        raw = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little") + raw[8:]
    elif kind == "bytes":  # tensor data: loads (the values are garbage) or not, never a crash
        at = data.draw(st.integers(8 + n, len(raw) - 1))
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=16)) + raw[at + 1:]
    else:
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    path.write_bytes(raw)


def mutate_checkpoint(data, ck: Path) -> str:
    target = data.draw(st.sampled_from(["state.json", "state.json", "model.safetensors", "optimizer.safetensors",
                                        "tokenizer.json"]))
    if target.endswith(".json"):
        obj = json.loads((ck / target).read_text())
        if target == "state.json" and data.draw(st.booleans()):  # often: inside the parts a resume uses
            part = data.draw(st.sampled_from(["train_config", "sampler", "schedule", "model_config", "history"]))
            mutate_json(data, obj[part]) if obj[part] else obj.pop(part)
        else:
            mutate_json(data, obj)
        (ck / target).write_text(json.dumps(obj))
    else:
        mutate_safetensors(data, ck / target)
    if target != "state.json" and data.draw(st.sampled_from(["rehash"] * 4 + ["stale hash"])) == "rehash":
        rehash(ck)  # usually "fixed" by hand, so the checks behind the checksum are reached
    return target


def assert_named(err: Exception, ck: Path):
    assert isinstance(err, CheckpointError), repr(err)
    msg = str(err)
    assert any(str(ck / f) in msg for f in (*ckmod.FILES, "state.json")) or str(ck) in msg, msg


@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_a_mutated_checkpoint_loads_or_is_a_checkpoint_error_naming_the_file(base_run, tmp_path_factory,
                                                                                    data):
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    try:
        run = work / "run"
        shutil.copytree(base_run, run, symlinks=True)
        ck = run / "checkpoint"
        target = mutate_checkpoint(data, ck)
        for load in (tinylm.load, load_checkpoint):
            try:
                load(ck)
                event(f"{target}: {load.__name__} loads")
            except Exception as e:  # noqa: BLE001 - the point: which exception
                assert_named(e, ck)
                event(f"{target}: {load.__name__}: {str(e).split(': ', 1)[-1][:30]}")
        try:
            tc = json.loads((ck / "state.json").read_text())["train_config"]
            same_data = tc["data"] == json.loads((base_run / "checkpoint" / "state.json").read_text())[
                "train_config"]["data"]
        except (ValueError, KeyError, TypeError):
            same_data = True
        try:  # the whole resume: the train_config, the optimizer, sampler and schedule states
            if same_data:
                train(TrainConfig(out_dir=str(run)), resume=True, sources={})
            else:  # other data (the built-in corpus, say): too slow to read here; check the config
                pretrain._saved_config(tc, ck / "state.json")
        except CheckpointError as e:
            assert_named(e, ck)
        except ValueError as e:
            assert "nothing to train" in str(e), repr(e)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- crash test: SIGKILL at random instants, resume, the same run ------------------------------

def temporaries(out: Path) -> list[Path]:
    def temp(p):
        return ".tmp" in p.name or ".new-" in p.name

    # the top ones only (a temporary directory's own temporaries go with it)
    return sorted(p for p in out.rglob("*") if temp(p) and not any(temp(q) for q in p.relative_to(out).parents))


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume_ends_with_the_straight_runs_losses(corpus, tmp_path, straight):
    """A training run killed (SIGKILL) at seeded random instants: some tries a random delay after
    a new checkpoint appears (mid-step, mid-eval, mid-plot), others just after a save's temporary
    directory appears (mid-save). Each time --resume continues it; at the end its log and history
    are exactly a straight run's, and no temporary is left. What each kill left is removed by
    the next run, with a line naming it."""
    rng = random.Random(16)
    out = tmp_path / "run"
    pending: list[Path] = []      # what the last kill left: the next run must say it removed it
    mid_save = 0
    for attempt in range(6):
        before = link_target(out)
        p = start_training(corpus, out) if attempt == 0 else start_resume(out)
        if attempt % 2 == 0:
            if wait_for(lambda: link_target(out) not in (None, before), p):
                time.sleep(rng.uniform(0.0, 0.6))
        else:
            mine = f".tmp-{p.pid}"
            if wait_for(lambda: any(q.name.endswith(mine) for q in (out / "checkpoints").glob("*")), p, poll=0.0005):
                time.sleep(rng.uniform(0.0, 0.02))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        for q in pending:
            assert f"removed {q}" in stdout, (q, stdout)
        if p.returncode == 0:  # it finished before the kill
            pending = []
            break
        assert p.returncode == -signal.SIGKILL, stderr
        assert load_checkpoint(out / "checkpoint")["step"] > 0   # always a complete checkpoint
        pending = temporaries(out)
        mid_save += bool(pending)
    else:
        r = resume_to_end(out)
        done = load_checkpoint(out / "checkpoint")["step"] == STEPS and "nothing to train" in r.stderr
        assert r.returncode == 0 or done, r.stderr
        for q in pending:
            assert f"removed {q}" in r.stdout, (q, r.stdout)
    print(f"{mid_save} of the kills left a temporary behind")
    losses, history = straight
    assert train_losses(out) == losses
    assert sorted(train_losses(out)) == list(range(1, STEPS + 1))
    assert load_checkpoint(out / "checkpoint")["history"] == history
    assert temporaries(out) == []
