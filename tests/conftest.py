"""Shared test settings.

Hypothesis profiles: ``dev`` (few examples, for the edit-test loop) and ``ci`` (more examples,
the default). Pick one with ``HYPOTHESIS_PROFILE=dev``. ``deadline=None`` everywhere: the first
example of a test may include a Numba JIT compile.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---- long single-threaded subprocesses, run side by side ----------------------------------
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_side_by_side(jobs: dict, timeout: float = 900) -> dict:
    """{name: (argv, extra env)} -> {name: (returncode, stdout + stderr)}, all started at once.

    The CUDA-simulator checks are pure Python on one core each (every simulated GPU thread is a
    Python thread); one after another they left the second core idle for minutes of CI. Output
    goes to temporary files, not pipes, so a long traceback cannot block a process."""
    procs = {}
    for name, (argv, extra) in jobs.items():
        env = dict(os.environ)
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        env.update(extra)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = tempfile.TemporaryFile(mode="w+")
        procs[name] = (subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=out,
                                        stderr=subprocess.STDOUT, text=True), out)
    results = {}
    for name, (p, out) in procs.items():
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        out.seek(0)
        results[name] = (rc, out.read())
        out.close()
    return results


@pytest.fixture(scope="session")
def side_by_side():
    """``run_side_by_side`` for a test module's own subprocesses."""
    return run_side_by_side


@pytest.fixture(scope="session")
def gpucheck():
    """``python -m kernels._gpucheck`` in its three modes, side by side (tests/test_kernels_gpu.py,
    tests/test_amp_kernels.py): {mode: (returncode, output)}."""
    sim = {"NUMBA_ENABLE_CUDASIM": "1"}
    return run_side_by_side({"sim": (["-m", "kernels._gpucheck", "sim"], sim),
                             "sim16": (["-m", "kernels._gpucheck", "sim16"], sim),
                             "ptx": (["-m", "kernels._gpucheck", "ptx"], {})})
