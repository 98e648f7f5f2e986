"""16-bit storage formats: bfloat16 <-> float32 conversion (NumPy reference + Numba), float16.

bf16 is the top half of a float32: 1 sign bit, the same 8 exponent bits, 7 mantissa bits.
NumPy has no bfloat16 and Numba cannot compile ml_dtypes' one, so a bf16 array is a ``uint16``
array of those top halves, and the conversions are integer arithmetic on ``uint32`` views.
fp16 is NumPy's ``float16`` (IEEE binary16: 5 exponent bits, 10 mantissa bits), converted with
``astype`` (round to nearest even in NumPy's own C code).

    bf16 -> f32:  u32 = u16 << 16                                    (exact: every bf16 is a float32)
    f32 -> bf16:  round to nearest, ties to even, on the bits:
                  u16 = (u32 + 0x7fff + ((u32 >> 16) & 1)) >> 16
                  NaN -> sign | 0x7fc0 (a quiet NaN: truncating a NaN whose payload sits in the
                  low 16 bits would give an infinity); +-inf stay +-inf (the addition never
                  carries out of an all-ones exponent with a zero mantissa); a finite value that
                  rounds above the largest bf16 becomes +-inf, as IEEE rounding says; subnormals
                  round like any other value (same integer rule: the bit layout is monotonic).
    f32 -> bf16, stochastic: u16 = (u32 + (r & 0xffff)) >> 16 with r a uniform uint32: rounds up
                  with probability (low 16 bits) / 2^16, so the result is unbiased in expectation
                  (llm.c's ``stochastic_rounding``); NaN and +-inf as above.

These are exactly ml_dtypes' conversions (tests/test_amp_formats.py: all 65,536 bf16 patterns
and Hypothesis-drawn float32, NaN, infinities, subnormals and ties included).

The stochastic stream: ``r_i = hash32(seed, i)``, a counter-based hash (the finaliser of
MurmurHash3, applied to i mixed with the seed), so a step's randoms depend only on (seed, i):
no generator state to checkpoint, any thread count gives the same bits, and a resumed run
rounds exactly as the uninterrupted one. The caller passes one seed per step.

Leaves out: float8 formats; bf16 arithmetic (there is none here: 16-bit is a storage format,
every kernel computes in float32; kernels/__init__.py has the policy).
References: Kalamkar et al. 2019 "A Study of BFLOAT16 for Deep Learning Training"; llm.c
llmc/cuda_utils.cuh (stochastic rounding); IEEE 754-2008 binary16.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

BF16 = np.dtype(np.uint16)     # the storage dtype of a bf16 array (its tag: nothing else in kernels/ is uint16)
FP16 = np.dtype(np.float16)

_F32_SIGN = np.uint32(0x80000000)
_F32_ABS = np.uint32(0x7FFFFFFF)
_F32_INF = np.uint32(0x7F800000)


def is_16bit(a) -> bool:
    """True for a bf16 (uint16) or fp16 (float16) array."""
    dt = getattr(a, "dtype", None)
    return dt == BF16 or dt == FP16


def format_of(a) -> str:
    """"bf16", "fp16", or the NumPy dtype name of any other array."""
    dt = np.dtype(a.dtype)
    return "bf16" if dt == BF16 else "fp16" if dt == FP16 else dt.name


# ---- NumPy reference (works on CuPy arrays too: it uses only the array's own operators) -------

def bf16_to_f32_ref(u16):  # (...) uint16 -> (...) float32
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_ref(x):  # (...) float32 -> (...) uint16, round to nearest even
    u = x.astype(np.float32, copy=False).view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    r = ((u + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = (u & _F32_ABS) > _F32_INF
    qnan = ((u >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return np.where(nan, qnan, r).astype(np.uint16)


def hash32_ref(seed, i):  # seed int, i uint32 array -> uint32 array
    with np.errstate(over="ignore"):
        h = (i.astype(np.uint32) * np.uint32(0x9E3779B1)) ^ np.uint32(seed & 0xFFFFFFFF)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


def f32_to_bf16_sr_ref(x, seed):  # (...) float32, int -> (...) uint16, stochastic rounding
    u = x.astype(np.float32, copy=False).reshape(-1).view(np.uint32)
    r = hash32_ref(seed, np.arange(u.size, dtype=np.uint32)) & np.uint32(0xFFFF)
    special = (u & _F32_INF) == _F32_INF  # inf and NaN: round to nearest (NaN -> qNaN)
    with np.errstate(over="ignore"):
        out = ((u + r) >> np.uint32(16)).astype(np.uint16)
    # a finite value must not round into the inf/NaN patterns' neighbours by the carry: it may
    # reach +-inf (the largest bf16 rounded up), exactly as round-to-nearest can
    out = np.where(special, f32_to_bf16_ref(x.reshape(-1)), out)
    return out.reshape(x.shape)


# ---- Numba CPU (flat contiguous arrays: the wrappers below ravel; see docs/performance.md,
# "A parallel loop that silently did nothing") ---------------------------------------------

@njit(cache=True, parallel=True)
def _bf16_to_f32_cpu(u16, out32):  # (n,) uint16, (n,) uint32
    for i in prange(u16.size):
        out32[i] = np.uint32(u16[i]) << np.uint32(16)


@njit(cache=True, inline="always")
def _rne(u):  # uint32 bits -> uint16 bits
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16(((u >> np.uint32(16)) & np.uint32(0x8000)) | np.uint32(0x7FC0))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, parallel=True)
def _f32_to_bf16_cpu(u32, out16):  # (n,) uint32, (n,) uint16
    for i in prange(u32.size):
        out16[i] = _rne(u32[i])


@njit(cache=True, parallel=True)
def _round_bf16_cpu(u32, out32):  # float32 bits -> the nearest bf16, as float32 bits
    for i in prange(u32.size):
        out32[i] = np.uint32(_rne(u32[i])) << np.uint32(16)


@njit(cache=True, inline="always")
def _hash32(seed, i):
    # Numba widens uint32 arithmetic to 64 bits: truncate after each product (mod 2^32)
    h = np.uint32(np.uint32(i) * np.uint64(0x9E3779B1) & np.uint64(0xFFFFFFFF)) ^ seed
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint64(0x85EBCA6B) & np.uint64(0xFFFFFFFF))
    h = np.uint32(h ^ (h >> np.uint32(13)))
    h = np.uint32(h * np.uint64(0xC2B2AE35) & np.uint64(0xFFFFFFFF))
    return np.uint32(h ^ (h >> np.uint32(16)))


@njit(cache=True, parallel=True)
def _f32_to_bf16_sr_cpu(u32, seed, out16):  # (n,) uint32, uint32, (n,) uint16
    for i in prange(u32.size):
        u = u32[i]
        if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000):
            out16[i] = _rne(u)
        else:
            out16[i] = np.uint16((u + (_hash32(seed, i) & np.uint32(0xFFFF))) >> np.uint32(16))


@njit(cache=True, parallel=True)
def _round_bf16_sr_cpu(u32, seed, out32):  # stochastic rounding, result as float32 bits
    for i in prange(u32.size):
        u = u32[i]
        if (u & np.uint32(0x7F800000)) == np.uint32(0x7F800000):
            b = _rne(u)
        else:
            b = np.uint16((u + (_hash32(seed, i) & np.uint32(0xFFFF))) >> np.uint32(16))
        out32[i] = np.uint32(b) << np.uint32(16)


@njit(cache=True, parallel=True)
def _round_fp16_cpu(xf, xu, out):  # (n,) float32 and its uint32 view -> (n,) uint32 bits
    # float32 -> the nearest fp16 value, kept as float32 (what x.astype(float16).astype(float32)
    # gives, without the two temporaries: a gradient buffer at GPT-2 small is 500 MB)
    for i in prange(xu.size):
        u = xu[i]
        a = u & np.uint32(0x7FFFFFFF)
        if a > np.uint32(0x7F800000):  # NaN -> quiet NaN, sign kept
            out[i] = (u & np.uint32(0x80000000)) | np.uint32(0x7FC00000)
        elif a >= np.uint32(0x477FF000):  # >= 65520 = 65504 + half its step: +-inf
            out[i] = (u & np.uint32(0x80000000)) | np.uint32(0x7F800000)
        elif a < np.uint32(0x38800000):  # below 2^-14: fp16 subnormals, a fixed step of 2^-24
            r = np.rint(xf[i] * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08)
            # (a zero keeps the input's sign, as IEEE rounding does)
            out[i] = np.float32(r).view(np.uint32) if r != 0 else (u & np.uint32(0x80000000))
        else:  # keep 10 of float32's 23 mantissa bits, round to nearest even on the 13 dropped
            out[i] = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)


@njit(cache=True, parallel=True)
def _f32_to_fp16_cpu(u32, xf, out16):  # (n,) float32 bits and values -> (n,) fp16 bits, as NumPy's astype
    # NumPy converts float32 -> float16 one element at a time on one core; this is the same
    # rounding (nearest, ties to even; overflow -> inf; subnormals), parallel and branch-free
    # (every case computed, one selected: 2x the branchy loop here): an fp16 run stores every
    # activation, so the conversion is on every layer's path
    for i in prange(u32.size):
        u = u32[i]
        sign = (u >> np.uint32(16)) & np.uint32(0x8000)
        a = u & np.uint32(0x7FFFFFFF)
        # normal: rebias the exponent (127 -> 15), keep 10 mantissa bits, nearest even on the
        # 13 dropped (a carry into the exponent is right: 65504 + a tie or more -> inf)
        b = (a - np.uint32(0x38000000)) >> np.uint32(13)
        rem = a & np.uint32(0x1FFF)
        up = (rem > np.uint32(0x1000)) | ((rem == np.uint32(0x1000)) & ((b & np.uint32(1)) == np.uint32(1)))
        r = b + np.uint32(up)
        # below 2^-14: a subnormal k * 2^-24, k = |x| * 2^24 (exact) rounded to nearest even by
        # the float addition of 2^23, after which k is the mantissa's low bits
        k = np.float32(abs(xf[i]) * np.float32(16777216.0) + np.float32(8388608.0)).view(np.uint32) & np.uint32(0x7FFFFF)
        r = r if a >= np.uint32(0x38800000) else k
        r = np.uint32(0x7C00) if a >= np.uint32(0x477FF000) else r  # >= 65520, and inf: inf
        # NaN -> a quiet NaN, sign and top payload bits kept
        r = (np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))) if a > np.uint32(0x7F800000) else r
        out16[i] = np.uint16(sign | r)


@njit(cache=True, inline="always")
def _fp16_value(h):  # fp16 bits (uint16) -> the float32 value (exact)
    # the magnitude's bits shifted into a float32's place are that value times 2^-112, for
    # normals and subnormals alike: one exact multiplication by 2^112 (never compile this with
    # fastmath: subnormal float32 inputs must not be flushed), then inf/NaN and the sign
    u = np.uint32(h)
    v = np.uint32((u & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * np.float32(2.0 ** 112)
    if (u & np.uint32(0x7C00)) == np.uint32(0x7C00):
        v = np.float32(np.inf) if (u & np.uint32(0x3FF)) == np.uint32(0) else np.float32(np.nan)
    return -v if (u & np.uint32(0x8000)) else v


@njit(cache=True, parallel=True)
def _fp16_to_f32_cpu(h16, out):  # (n,) fp16 bits -> (n,) float32 (exact)
    for i in prange(h16.size):
        out[i] = _fp16_value(h16[i])


@njit(cache=True)
def decode_rows(src, fmt_code, dst):  # (r, C) bf16 (fmt_code 1) or fp16 (2) bits -> dst (r, C) float32
    """One thread's decode of a block (kernels/head_ce.py decodes the head's weight block by
    block inside its own parallel loop). Not inlined: it keeps these flags, without fastmath,
    whatever the caller's."""
    for r in range(src.shape[0]):
        for c in range(src.shape[1]):
            dst[r, c] = (np.uint32(np.uint32(src[r, c]) << np.uint32(16)).view(np.float32) if fmt_code == 1
                         else _fp16_value(src[r, c]))


def f32_to_fp16(x, out=None):
    """float32 -> float16 (round to nearest even; overflow -> inf): NumPy's ``astype``, in
    parallel (``out``: a float16 array to fill)."""
    if not (_numpy(x) and (out is None or (_numpy(out) and out.flags.c_contiguous and out.dtype == FP16))):
        with np.errstate(over="ignore"):
            if out is None:
                return x.astype(np.float16)
            out[...] = x
            return out
    xf = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    res = np.empty(xf.size, np.float16) if out is None else out
    _f32_to_fp16_cpu(xf.view(np.uint32), xf, res.reshape(-1).view(np.uint16))
    return res.reshape(np.shape(x)) if out is None else out


def fp16_to_f32(h):
    """float16 -> float32 (exact): NumPy's ``astype``, in parallel."""
    if not _numpy(h):
        return h.astype(np.float32)
    flat = np.ascontiguousarray(h).reshape(-1).view(np.uint16)
    out = np.empty(flat.size, np.float32)
    _fp16_to_f32_cpu(flat, out)
    return out.reshape(h.shape)


def _numpy(a) -> bool:
    return isinstance(a, np.ndarray)


def bf16_to_f32(u16):
    """uint16 bf16 bits -> float32 (a new array)."""
    if not _numpy(u16):
        return bf16_to_f32_ref(u16)
    flat = np.ascontiguousarray(u16).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint32)
    _bf16_to_f32_cpu(flat, out)
    return out.view(np.float32).reshape(u16.shape)


def f32_to_bf16(x, out=None):
    """float32 -> uint16 bf16 bits, round to nearest even (``out``: a uint16 array to fill)."""
    if not _numpy(x):
        r = f32_to_bf16_ref(x)
        if out is None:
            return r
        out[...] = r
        return out
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    if out is not None and out.dtype == BF16 and out.flags.c_contiguous:
        _f32_to_bf16_cpu(flat, out.reshape(-1))  # a view of out: filled in place
        return out
    res = np.empty(flat.size, np.uint16)
    _f32_to_bf16_cpu(flat, res)
    if out is None:
        return res.reshape(np.shape(x))
    out[...] = res.reshape(out.shape)
    return out


def f32_to_bf16_sr(x, seed: int):
    """float32 -> uint16 bf16 bits with stochastic rounding from the stream of ``seed``."""
    if not _numpy(x):
        return f32_to_bf16_sr_ref(x, seed)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(flat.size, np.uint16)
    _f32_to_bf16_sr_cpu(flat, np.uint32(seed & 0xFFFFFFFF), out)
    return out.reshape(np.shape(x))


def round_to_format(x, fmt: str, out=None, seed: int | None = None):
    """float32 values -> the nearest values of ``fmt`` ("bf16", "fp16", "fp32"), kept as float32
    (``out`` may be ``x``: in place). With ``seed`` (bf16 only): stochastic rounding."""
    out = x if out is None else out
    if fmt == "fp32":
        if out is not x:
            out[...] = x
        return out
    if fmt == "fp16":
        if seed is not None:
            raise ValueError("stochastic rounding is implemented for bf16 only")
        if (_numpy(x) and _numpy(out) and x.dtype == out.dtype == np.float32
                and x.flags.c_contiguous and out.flags.c_contiguous):
            xf = x.reshape(-1)
            _round_fp16_cpu(xf, xf.view(np.uint32), out.reshape(-1).view(np.uint32))
            return out
        with np.errstate(over="ignore"):
            out[...] = x.astype(np.float16).astype(np.float32)  # RNE; overflow -> inf (as fp16 storage)
        return out
    if fmt != "bf16":
        raise ValueError(f"unknown format {fmt!r}: expected fp32, bf16 or fp16")
    if not (_numpy(x) and _numpy(out) and x.dtype == out.dtype == np.float32
            and x.flags.c_contiguous and out.flags.c_contiguous):
        r = f32_to_bf16_ref(x) if seed is None else f32_to_bf16_sr_ref(x, seed)
        out[...] = bf16_to_f32_ref(r)
        return out
    xu, ou = x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint32)
    if seed is None:
        _round_bf16_cpu(xu, ou)
    else:
        _round_bf16_sr_cpu(xu, np.uint32(seed & 0xFFFFFFFF), ou)
    return out


def to_f32(a):
    """A bf16 (uint16) or fp16 array as float32; any other float array is returned as is."""
    dt = a.dtype
    if dt == BF16:
        return bf16_to_f32(a)
    if dt == FP16:
        return fp16_to_f32(a)
    return a


def from_f32(x, fmt: str):
    """float32 -> the storage array of ``fmt``: uint16 for bf16, float16 for fp16, x for fp32."""
    if fmt == "bf16":
        return f32_to_bf16(x)
    if fmt == "fp16":
        return f32_to_fp16(x)
    if fmt == "fp32":
        return x
    raise ValueError(f"unknown format {fmt!r}: expected fp32, bf16 or fp16")
