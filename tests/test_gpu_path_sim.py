"""The whole GPU path, run on the CPU: a tiny GPT's (and a tiny Llama's) training step with every op dispatched to
its numba.cuda kernel (``TINYLM_KERNELS=gpu``) under Numba's CUDA simulator, against the same
step on the NumPy references. This is what shows that ``tinylm.functional``, the model and the
optimizer drive the GPU kernels correctly (argument order, shapes, dtypes, outputs written),
without a GPU. Runs in subprocesses (the simulator must be chosen before numba.cuda is imported),
the four side by side.
"""
import numpy as np
import pytest

STEP = r"""
import sys, numpy as np
import tinylm
from tinylm.models import GPT, GPTConfig, Llama, LlamaConfig
from tinylm.optim import AdamW
if sys.argv[2] == "gpt":
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=5, vocab_size=11), seed=3)
else:
    m = Llama(LlamaConfig(n_layer=1, n_head=2, n_kv_head=1, n_embd=8, block_size=5, vocab_size=11), seed=3)
opt = AdamW(m.param_groups(0.1), lr=1e-2)
idx = np.random.default_rng(0).integers(0, 11, (2, 5))
tgt = np.roll(idx, -1, axis=1); tgt[0, -1] = -100          # one ignored target
opt.zero_grad()
logits, loss = m(idx, tgt)
loss.backward()
norm = opt.clip_grad_norm(0.5)
opt.step()
out = {"logits": logits.numpy(), "loss": np.array(loss.item()), "norm": np.array(norm)}
out["generated"] = m.generate(idx[0, :2], 3, temperature=0.0)  # the KV-cache path too
out.update({"grad." + n: p.grad.copy() for n, p in m.named_parameters()})
out.update({"param." + n: p.data.copy() for n, p in m.named_parameters()})
np.savez(sys.argv[1], **out)
"""


@pytest.fixture(scope="module")
def steps(tmp_path_factory, side_by_side):
    """The step on the references and on the simulated GPU kernels, GPT and Llama: four
    subprocesses side by side (tests/conftest.py: each is single-threaded Python)."""
    d = tmp_path_factory.mktemp("gpu_path")
    jobs = {(model, kind): (["-c", STEP, str(d / f"{model}-{kind}.npz"), model],
                            {"TINYLM_KERNELS": kind, **({"NUMBA_ENABLE_CUDASIM": "1"} if kind == "gpu" else {})})
            for model in ("gpt", "llama") for kind in ("ref", "gpu")}
    out = {}
    for key, (rc, text) in side_by_side(jobs).items():
        assert rc == 0, text[-3000:]
        with np.load(d / f"{key[0]}-{key[1]}.npz", allow_pickle=False) as z:
            out[key] = dict(z)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_training_step_on_gpu_kernels_matches_references(steps, model):
    ref, gpu = steps[(model, "ref")], steps[(model, "gpu")]
    assert ref.keys() == gpu.keys()
    for k in ref:
        np.testing.assert_allclose(gpu[k], ref[k], rtol=2e-4, atol=2e-6, err_msg=k)
    assert np.isfinite(ref["loss"]) and ref["norm"] > 0.5  # clipping was active
