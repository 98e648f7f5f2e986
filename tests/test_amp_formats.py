"""bf16 and fp16 conversions against ml_dtypes (an optional test dependency: the dev extra).

float32 -> bf16 -> float32 must be bit-exact against ml_dtypes for every one of the 65,536 bf16
bit patterns (each as a float32, and each float32 halfway between two neighbours: the ties)
and for Hypothesis-drawn float32 bit patterns, which cover NaN payloads, infinities,
subnormals and zeros of both signs by construction (any 32 bits are a float32).
"""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import _formats as K
from tinylm.amp import formats

md = pytest.importorskip("ml_dtypes")

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def md_bf16(x32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(x32, np.float32).astype(md.bfloat16).view(np.uint16)


def bits(a):
    return np.asarray(a).view(np.uint32 if np.asarray(a).dtype.itemsize == 4 else np.uint16)


def test_every_bf16_pattern_decodes_and_round_trips_like_ml_dtypes():
    want = ALL16.view(md.bfloat16).astype(np.float32)
    for got in (K.bf16_to_f32(ALL16), K.bf16_to_f32_ref(ALL16), formats.to_f32(ALL16)):
        np.testing.assert_array_equal(bits(got), bits(want))  # NaN payloads included: a plain shift
    x = want
    for enc in (K.f32_to_bf16, K.f32_to_bf16_ref, lambda a: formats.from_f32(a, "bf16")):
        np.testing.assert_array_equal(enc(x), md_bf16(x))
    nan = np.isnan(x)
    np.testing.assert_array_equal(K.f32_to_bf16(x)[~nan], ALL16[~nan])  # the identity off NaN
    assert set(K.f32_to_bf16(x)[nan].tolist()) == {0x7FC0, 0xFFC0}  # NaN -> quiet NaN, sign kept


def test_ties_and_neighbours_of_every_bf16_round_like_ml_dtypes():
    base = ALL16.astype(np.uint32) << 16
    for low in (0x7FFF, 0x8000, 0x8001, 0x0001, 0xFFFF):  # just below, at, just above the tie
        x = (base | np.uint32(low)).view(np.float32)
        np.testing.assert_array_equal(K.f32_to_bf16(x), md_bf16(x))
        np.testing.assert_array_equal(K.f32_to_bf16_ref(x), md_bf16(x))
        r = K.round_to_format(x.copy(), "bf16")
        np.testing.assert_array_equal(bits(r), bits(md_bf16(x).view(md.bfloat16).astype(np.float32)))


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_hypothesis_float32_bit_patterns(words):
    x = np.array(words, dtype=np.uint32).view(np.float32)  # NaN, inf, subnormals: all reachable
    want = md_bf16(x)
    np.testing.assert_array_equal(K.f32_to_bf16(x), want)
    np.testing.assert_array_equal(K.f32_to_bf16_ref(x), want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want16 = x.astype(np.float16).astype(np.float32)
    got16 = K.round_to_format(x, "fp16", out=np.empty_like(x))
    nan = np.isnan(want16)
    np.testing.assert_array_equal(np.isnan(got16), nan)
    np.testing.assert_array_equal(bits(got16[~nan]), bits(want16[~nan]))


@given(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))
def test_hypothesis_float32_values(v):
    x = np.array([v], np.float32)
    np.testing.assert_array_equal(K.f32_to_bf16(x), md_bf16(x))


def test_specials_by_name():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0 + 2**-8,
                  1.0 + 3 * 2**-8], np.float32)
    got = K.f32_to_bf16(x)
    assert [hex(v) for v in got] == ["0x0", "0x8000", "0x7f80", "0xff80", "0x7fc0", "0x0", "0x8000",
                                     "0x7f80", "0xff80", "0x3f80", "0x3f82"]  # ties to even: 1.0, 1 + 2^-6


def test_fp16_rounding_matches_numpy_float16_on_its_whole_range():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = h.astype(np.float32)
    with np.errstate(invalid="ignore"):
        mid = (x[:-1] + x[1:]) / 2  # midpoints (ties) between neighbours, exact in float32
    for a in (x, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))):
        a = a[np.isfinite(a)].astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = a.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(bits(K.round_to_format(a, "fp16", out=np.empty_like(a))), bits(want))


def _numpy_fp16(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return a.astype(np.float16)


def _same_fp16(got, want):
    """Bit for bit, except that a NaN only has to stay a NaN (its payload is NumPy's business)."""
    nan = np.isnan(want.astype(np.float32))
    assert np.isnan(got[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_fp16_storage_conversions_match_numpy_on_every_pattern_and_tie():
    # the engine's parallel float32 <-> float16 (kernels/_formats.py f32_to_fp16, fp16_to_f32)
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = K.fp16_to_f32(h)
    finite = np.isfinite(h)
    np.testing.assert_array_equal(bits(x[finite]), bits(h[finite].astype(np.float32)))
    assert np.isnan(x[np.isnan(h)]).all() and np.array_equal(np.isinf(x), np.isinf(h))
    with np.errstate(invalid="ignore"):
        mid = (x[:-1] + x[1:]) / 2  # ties between neighbours, including 65520 (-> inf) and 2^-25 (-> 0)
    for a in (x, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
              np.array([1e9, -1e30, 3e-8, -3e-8, 2.0 ** -26, np.float32(2.0 ** -25) * np.float32(1.0000001)],
                       np.float32)):
        a = a.astype(np.float32)
        _same_fp16(K.f32_to_fp16(a), _numpy_fp16(a))


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=300))
def test_hypothesis_float32_to_fp16(words):
    a = np.array(words, dtype=np.uint32).view(np.float32)
    _same_fp16(K.f32_to_fp16(a), _numpy_fp16(a))


def test_stochastic_rounding_is_unbiased_seeded_and_matches_its_reference():
    x = np.full(200_000, 1.0 + 2**-9, np.float32)  # a quarter of the way from 1.0 to the next bf16
    a, b = K.f32_to_bf16_sr(x, 7), K.f32_to_bf16_sr(x, 7)
    np.testing.assert_array_equal(a, b)  # the same seed gives the same bits
    assert not np.array_equal(a, K.f32_to_bf16_sr(x, 8))
    np.testing.assert_array_equal(a, K.f32_to_bf16_sr_ref(x, 7))
    assert set(a.tolist()) == {0x3F80, 0x3F81}  # only the two neighbours
    assert abs(K.bf16_to_f32(a).astype(np.float64).mean() - (1.0 + 2**-9)) < 2e-5
    sp = np.array([np.inf, -np.inf, np.nan, 3.3895314e38], np.float32)
    got = K.f32_to_bf16_sr(sp, 1)
    assert got[0] == 0x7F80 and got[1] == 0xFF80 and got[2] == 0x7FC0 and got[3] in (0x7F7F, 0x7F80)
    r = K.round_to_format(x.copy(), "bf16", seed=7)
    np.testing.assert_array_equal(bits(r), bits(K.bf16_to_f32(a)))


def test_format_helpers():
    assert formats.storage_dtype("bf16") == np.uint16 and formats.storage_dtype("fp16") == np.float16
    assert formats.format_of(np.zeros(1, np.uint16)) == "bf16" and formats.format_of(np.zeros(1, np.float16)) == "fp16"
    with pytest.raises(ValueError, match="unknown format"):
        formats.storage_dtype("fp8")
    assert formats.to_f32(formats.from_f32(np.array([1.5], np.float32), "fp16")).dtype == np.float32
