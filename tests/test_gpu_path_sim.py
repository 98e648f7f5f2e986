"""The whole GPU path, run on the CPU: a tiny GPT's (and a tiny Llama's) training step with every op dispatched to
its numba.cuda kernel (``TINYLM_KERNELS=gpu``) under Numba's CUDA simulator, against the same
step on the NumPy references. This is what shows that ``tinylm.functional``, the model and the
optimizer drive the GPU kernels correctly (argument order, shapes, dtypes, outputs written),
without a GPU. Runs in subprocesses: the simulator must be chosen before numba.cuda is imported.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

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


def run_step(path, kernels_env, sim, model="gpt"):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TINYLM_KERNELS=kernels_env)
    if sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    else:
        env.pop("NUMBA_ENABLE_CUDASIM", None)
    r = subprocess.run([sys.executable, "-c", STEP, str(path), model], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(path, allow_pickle=False) as z:
        return dict(z)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_training_step_on_gpu_kernels_matches_references(tmp_path, model):
    ref = run_step(tmp_path / "ref.npz", "ref", sim=False, model=model)
    gpu = run_step(tmp_path / "gpu.npz", "gpu", sim=True, model=model)
    assert ref.keys() == gpu.keys()
    for k in ref:
        np.testing.assert_allclose(gpu[k], ref[k], rtol=2e-4, atol=2e-6, err_msg=k)
    assert np.isfinite(ref["loss"]) and ref["norm"] > 0.5  # clipping was active
