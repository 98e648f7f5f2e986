"""16-bit inputs for every kernel family: convert on entry, compute in fp32, store on exit.

``kernels.get(op, *arrays)`` returns ``accept_16bit(op, fn)`` when one of the arrays it is
given is bf16 (uint16) or fp16 (float16). The wrapper converts each 16-bit float argument to
float32 (kernels/_formats.py: exact), calls the op's fp32 kernel (so it accumulates in fp32,
on the CPU and the GPU alike), and stores the outputs listed in ``ACTIVATION_OUTPUTS`` in the
input's format (round to nearest even); statistics (mean, rstd, log-sum-exp, per-row losses,
norms) stay fp32, since they are reductions the backward and the loss need at full precision.
In-place ops (AdamW, matmul_acc) write their updated arguments back in their own format.

Why at the dispatch and not inside each Numba loop: every family then has one code path in
fp32, tested once, and the conversion is one vectorised pass each way (kernels/_formats.py).
Its cost is an fp32 temporary per 16-bit argument; a fused per-tile conversion (read 16-bit,
compute, write 16-bit in the same loop) saves that memory traffic and is the next version.

On a real GPU, fp16 matmul goes to cuBLAS in fp16 with fp32 accumulation (CuPy's default
compute type for half GEMMs); CuPy has no bfloat16 dtype, so bf16 is converted like the rest.

Arguments that are integer ids or targets are never formats (``INTEGER_ARGS``): the callers
in tinylm.functional pass them as int64 already; the table guards a uint16 token array.
"""
from __future__ import annotations

import numpy as np

from kernels._common import is_cupy
from kernels._formats import BF16, FP16, f32_to_bf16, f32_to_fp16, to_f32

# The per-format tolerance of every op (kernels/_gpucheck.py check_16bit; tests/test_amp_kernels.py):
# max |got - want| / (1 + |want|) against the fp32 reference on the same decoded inputs. The
# outputs are rounded once to the format (half a step: 2^-8 relative for bf16's 8 significant
# bits, 2^-11 for fp16's 11); fp32 compute adds ~1e-6. Set at about 1.3x that bound.
TOLERANCE = {"bf16": 5e-3, "fp16": 7e-4}

# op -> indices of the outputs stored in the input's format (the rest stay float32)
ACTIVATION_OUTPUTS = {
    "layernorm_fwd": (0,), "layernorm_bwd": (0, 1, 2), "rmsnorm_fwd": (0,), "rmsnorm_bwd": (0, 1),
    "gelu_fwd": (0,), "gelu_bwd": (0,), "swiglu_fwd": (0,), "swiglu_bwd": (0, 1),
    "rope_fwd": (0,), "rope_bwd": (0,),
    "cross_entropy_fwd": (), "cross_entropy_bwd": (0,),   # per-row losses and lse: fp32
    "head_ce": (2, 3),                                     # loss rows, lse fp32; dx, dw in format
    "attention_fwd": (0,), "attention_bwd": (0, 1, 2), "attention_decode": (0,),
    "embedding_fwd": (0,), "embedding_bwd": (0,),
    "matmul": (0,), "sumsq": (),
    "adamw_update": (), "matmul_acc": (),                 # in place: see INPLACE_ARGS
}
INPLACE_ARGS = {"adamw_update": (0, 2, 3), "matmul_acc": (2,)}
INTEGER_ARGS = {"embedding_fwd": (0,), "embedding_bwd": (1,), "cross_entropy_fwd": (1,),
                "cross_entropy_bwd": (1,), "head_ce": (2,)}


def has_16bit(arrays) -> bool:
    for a in arrays:
        dt = getattr(a, "dtype", None)
        if dt is not None and (dt == BF16 or dt == FP16):
            return True
    return False


def _store(x32, fmt_dtype, out=None):  # round to nearest even (fp16: overflow -> inf)
    return (f32_to_bf16 if fmt_dtype == BF16 else f32_to_fp16)(x32, out=out)


def accept_16bit(op: str, fn):
    """``fn`` (an fp32 kernel of ``op``) taking bf16/fp16 arguments, as described above."""
    if op not in ACTIVATION_OUTPUTS:
        raise NotImplementedError(f"kernel {op!r} has no 16-bit rule in kernels/_lowp.py")
    outs, inplace, ints = ACTIVATION_OUTPUTS[op], INPLACE_ARGS.get(op, ()), INTEGER_ARGS.get(op, ())

    def run(*args):
        fmts = {a.dtype for i, a in enumerate(args) if i not in ints and has_16bit((a,))}
        if not fmts:
            return fn(*args)
        if len(fmts) > 1:
            raise TypeError(f"{op}: bf16 and fp16 arguments mixed in one call")
        fmt = fmts.pop()
        if op == "matmul" and fmt == FP16 and all(is_cupy(a) for a in args):
            return fn(*args)  # cuBLAS half GEMM, fp32 accumulation
        conv = [(to_f32(a) if i not in ints and has_16bit((a,)) else a) for i, a in enumerate(args)]
        res = fn(*conv)
        for i in inplace:
            if has_16bit((args[i],)):
                _store(conv[i], fmt, out=args[i])
        if inplace:
            return res
        single = not isinstance(res, tuple)
        items = (res,) if single else res
        items = tuple(_store(r, fmt) if k in outs and getattr(r, "dtype", None) == np.float32 else r
                      for k, r in enumerate(items))
        return items[0] if single else items

    run.__name__ = f"{getattr(fn, '__name__', op)}_16bit"
    run.__wrapped__ = fn
    return run
