"""The fp16 loss scaler's transitions, without a model: overflow, growth, the floor, state."""
import json

import pytest

from tinylm.amp import LossScaler, LossScaleTooSmall


def test_defaults_are_pytorchs():
    s = LossScaler()
    assert (s.scale, s.growth_interval, s.growth_factor, s.backoff_factor) == (2.0 ** 16, 2000, 2.0, 0.5)


def test_overflow_halves_skips_and_resets_the_growth_count():
    s = LossScaler(init_scale=1024.0, growth_interval=3)
    assert s.update(False) and s.update(False) and s.good_steps == 2
    assert s.update(True) is False  # the step is skipped
    assert (s.scale, s.good_steps, s.skipped) == (512.0, 0, 1)


def test_growth_after_the_interval_of_clean_steps():
    s = LossScaler(init_scale=4.0, growth_interval=3)
    assert [s.update(False) for _ in range(3)] == [True, True, True]
    assert (s.scale, s.good_steps, s.grown) == (8.0, 0, 1)
    for _ in range(3):
        s.update(False)
    assert s.scale == 16.0


def test_growth_stops_at_max_scale():
    s = LossScaler(init_scale=8.0, growth_interval=1, max_scale=16.0)
    s.update(False)
    s.update(False)
    assert s.scale == 16.0 and s.grown == 1


def test_the_floor_stops_training_with_a_clear_message():
    s = LossScaler(init_scale=4.0, min_scale=2.0)
    assert s.update(True) is False and s.scale == 2.0  # reaching the minimum is allowed
    with pytest.raises(LossScaleTooSmall, match=r"below its minimum 2.*bf16"):
        s.update(True)
    assert isinstance(LossScaleTooSmall("x"), FloatingPointError)  # the CLI's one-line error path


def test_state_round_trips_through_json_and_continues_identically():
    a = LossScaler(init_scale=64.0, growth_interval=4, min_scale=0.5)
    pattern = [False, True, False, False, True, False, False, False, False, False, True]
    for f in pattern[:5]:
        a.update(f)
    b = LossScaler.from_state(json.loads(json.dumps(a.state())))
    assert b.state() == a.state()
    assert [a.update(f) for f in pattern[5:]] == [b.update(f) for f in pattern[5:]]
    assert a.state() == b.state()


@pytest.mark.parametrize("kw", [dict(init_scale=0.0), dict(init_scale=float("inf")), dict(growth_interval=0),
                                dict(min_scale=2.0 ** 17), dict(backoff_factor=1.0)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        LossScaler(**kw)
