"""``tinylm train --preset``: the model and schedule are sized from measured speed."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tinylm.train import TrainConfig
from tinylm.train import presets


def _fake(rates):
    """A measure_fn giving tokens/s by n_embd, recording what it was asked."""
    asked = []

    def fn(cfg, vocab):
        asked.append((cfg.n_layer, cfg.n_embd, cfg.block_size, vocab))
        return rates[cfg.n_embd]

    return fn, asked


def test_plan_picks_the_largest_shape_the_budget_affords():
    rates = {128: 60_000.0, 192: 40_000.0, 256: 9_000.0, 320: 4_000.0, 384: 2_000.0}
    fn, asked = _fake(rates)
    cfg, rec = presets.plan(TrainConfig(), "hour", 4096, given=set(), measure_fn=fn, log=lambda m: None)
    left = 3600 * (1 - presets.MARGIN)
    for shape in presets.LADDER[:3]:
        n = presets.non_embedding_params(shape[0], shape[2])
        assert (rates[shape[2]] * left >= presets.TOKENS_PER_PARAM * n) == (shape[2] <= 192)
    # 192 is affordable, 256 is not: measuring stops at the first shape that is not
    assert [a[1] for a in asked] == [128, 192, 256]
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (4, 192, 128)
    tokens_per_step = cfg.batch_size * cfg.block_size
    assert cfg.max_steps == pytest.approx(left * 40_000 / tokens_per_step, rel=1e-3)
    assert cfg.warmup_steps == cfg.max_steps // 50 and cfg.eval_interval == cfg.max_steps // 20
    assert cfg.time_budget == pytest.approx(60.0, abs=0.05)
    assert [m["affordable"] for m in rec["measured"]] == [True, True, False]


def test_overnight_affords_a_larger_model_than_an_hour():
    rates = {128: 60_000.0, 192: 40_000.0, 256: 9_000.0, 320: 4_000.0, 384: 2_000.0}
    hour, _ = presets.plan(TrainConfig(), "hour", 4096, set(), measure_fn=_fake(rates)[0], log=lambda m: None)
    night, _ = presets.plan(TrainConfig(), "overnight", 4096, set(), measure_fn=_fake(rates)[0], log=lambda m: None)
    assert night.n_embd > hour.n_embd and night.time_budget == pytest.approx(480.0, abs=0.05)


def test_given_settings_are_kept_and_the_budget_counts_time_already_spent():
    fn, asked = _fake({96: 10_000.0})
    base = replace(TrainConfig(), n_layer=2, n_head=2, n_embd=96, lr=1e-3, batch_size=8)
    given = {"n_layer", "n_head", "n_embd", "lr", "batch_size", "time_budget"}
    cfg, _ = presets.plan(replace(base, time_budget=10.0), "overnight", 512, given, elapsed_s=120.0,
                          measure_fn=fn, log=lambda m: None)
    assert asked == [(2, 96, 128, 512)]  # the given shape alone is measured
    assert (cfg.n_layer, cfg.n_embd, cfg.lr, cfg.batch_size) == (2, 96, 1e-3, 8)
    assert cfg.time_budget == pytest.approx(8.0, abs=0.05)  # 10 minutes in all, 2 already spent
    assert cfg.max_steps == pytest.approx(480 * (1 - presets.MARGIN) * 10_000 / (8 * 128), rel=1e-3)


def test_smallest_shape_when_nothing_is_affordable():
    fn, asked = _fake({128: 10.0})
    cfg, rec = presets.plan(TrainConfig(), "hour", 4096, set(), measure_fn=fn, log=lambda m: None)
    assert cfg.n_embd == 128 and len(asked) == 1 and not rec["measured"][0]["affordable"]


def test_unknown_preset_and_preset_with_resume_are_errors(tmp_path):
    from tinylm.train import train

    with pytest.raises(ValueError, match="unknown; choose one of hour, overnight"):
        train(replace(TrainConfig(), out_dir=str(tmp_path)), preset="weekend")
    with pytest.raises(ValueError, match="drop --preset"):
        train(replace(TrainConfig(), out_dir=str(tmp_path)), resume=True, preset="hour")


@pytest.mark.slow
def test_a_preset_run_measures_plans_trains_and_records(tmp_path, monkeypatch, capsys):
    """A real (tiny) preset run: a given shape, a 0.4-minute budget, real measurement."""
    from tinylm.train import train

    monkeypatch.setattr(presets, "MEASURE_S", 0.3)
    cfg = replace(TrainConfig(), out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=32, block_size=32,
                  corpus_mb=0.3, vocab_size=300, time_budget=0.4, sample_tokens=0, progress=False,
                  eval_batches=2)
    sources = {k: "override" for k in ("n_layer", "n_head", "n_embd", "block_size", "corpus_mb", "vocab_size",
                                       "time_budget", "sample_tokens", "progress", "eval_batches")}
    result = train(cfg, preset="hour", sources=sources)
    rec = json.loads((tmp_path / "preset.json").read_text())
    assert rec["preset"] == "hour" and rec["budget_min"] == 0.4 and len(rec["measured"]) == 1
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    # the plan, or where the run's own speed stretched it (replan)
    planned = rec["replans"][-1]["to"] if rec.get("replans") else rec["chosen"]["max_steps"]
    assert state["train_config"]["max_steps"] == planned
    assert state["train_config"]["vocab_size"] == 300  # given: kept over the preset's 4096
    assert result["steps"] >= 1 and result["elapsed_s"] < 0.4 * 60 + 15
    assert "preset hour:" in capsys.readouterr().out


def test_replanner_stretches_the_schedule_to_the_speed_the_run_achieves(tmp_path):
    """Planned at 1 step/s, the run does 2: at the first validation after warmup it is
    stretched to what the time left allows; never before warmup, after half the schedule, or
    when the plan already fits."""
    from types import SimpleNamespace

    from tinylm.optim import Schedule

    rec = {"preset": "hour", "planned_steps_per_s": 1.0}
    lines = []
    replan = presets.replanner(rec, tmp_path, log=lines.append)
    cfg = SimpleNamespace(time_budget=10.0)  # minutes, counted from the trainer's start

    def trainer(step, end=540):
        return SimpleNamespace(cfg=cfg, schedule=Schedule(1e-3, 1e-4, 10, end), step=step)

    assert replan(trainer(5), 5.0, 4.0, 8) is None  # in warmup
    assert replan(trainer(300), 150.0, 149.0, 298) is None  # past half of the schedule
    assert replan(trainer(100, end=1200), 50.0, 49.0, 98) is None  # the plan fits (2 steps/s * 550 s)
    reach = replan(trainer(100), 50.0, 49.0, 98)  # 2 steps/s, 550 s left, less the margin
    assert reach == 100 + int(550 * (1 - presets.MARGIN) * 2.0)
    assert rec["replans"] == [{"at_step": 100, "steps_per_s": 2.0, "from": 540, "to": reach}]
    assert json.loads((tmp_path / "preset.json").read_text())["replans"] == rec["replans"]
    assert "schedule stretched from 540" in lines[0]


def test_trainer_follows_a_stretched_schedule_and_saves_it(tmp_path):
    """The loop's replan hook: the schedule is extended from the lr reached, the run goes on to
    the new end, and the checkpoint holds the new end (max_steps) and segment."""
    from tinylm.train import train
    from tinylm.train import pretrain

    calls = []

    real_trainer = pretrain.Trainer

    def patched(*a, **k):
        tr = real_trainer(*a, **k)

        def replan(t, since_start, since_first, steps):
            calls.append(t.step)
            return 12 if t.step == 4 else None

        tr.replan = replan
        return tr

    cfg = replace(TrainConfig(), out_dir=str(tmp_path), n_layer=1, n_head=2, n_embd=32, block_size=16,
                  corpus_mb=0.2, vocab_size=300, max_steps=8, warmup_steps=2, eval_interval=4, eval_batches=1,
                  sample_tokens=0, progress=False, batch_size=4)
    try:
        pretrain.Trainer = patched
        result = train(cfg)
    finally:
        pretrain.Trainer = real_trainer
    assert calls[:2] == [4, 8] and result["steps"] == 12
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 12 and state["train_config"]["max_steps"] == 12
    assert state["schedule"]["segments"][0][:2] == [4, 12]
