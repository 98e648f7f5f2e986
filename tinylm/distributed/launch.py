"""``tinylm train --nproc N ...``: the same command, re-run under ``mpiexec -n N``.

The mpiexec next to this Python (the ``mpich`` wheel of the ``mpi`` extra puts one in the
virtual environment's bin/) is preferred, else the first on PATH. Each rank gets
TINYLM_NUM_THREADS = cores / N unless it is set. mpiexec's output passes through; when it
reports a process that died (MPICH: "BAD TERMINATION ... PID p ... EXIT CODE: c"), the PID
is translated to the rank, from the table rank 0 prints at start ("tinylm: ranks: 0=pid@host
...").

    python -m tinylm.distributed.launch -n 2 -- python -m tinylm.distributed.selftest --out d
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

_TABLE = re.compile(r"^tinylm: ranks: (.*)$")
_PID = re.compile(r"PID (\d+) RUNNING AT (\S+)")
_CODE = re.compile(r"EXIT CODE: (\d+)")


def mpiexec_path() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return str(here)
    found = shutil.which("mpiexec")
    if not found:
        raise FileNotFoundError("--nproc needs mpiexec: pip install 'tinylm[mpi]' (mpi4py and the mpich wheel)")
    return found


def launch(n: int, command: list[str], extra_env: dict | None = None) -> int:
    """Run ``command`` on ``n`` ranks; returns mpiexec's exit status."""
    if n < 1:
        raise ValueError(f"--nproc must be >= 1, got {n}")
    env = dict(os.environ, **(extra_env or {}))
    if "TINYLM_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["TINYLM_NUM_THREADS"] = str(max(1, cores // n))
    argv = [mpiexec_path(), "-n", str(n), *command]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    pids: dict[str, str] = {}
    dead: dict[str, str] = {}

    def pump(src, dst):  # pass a stream through, watching for the rank table and mpiexec's report
        for line in src:
            dst.write(line)
            dst.flush()
            m = _TABLE.match(line.strip())
            if m:
                for item in m.group(1).split():
                    rank, _, where = item.partition("=")
                    pids[where.split("@")[0]] = rank
            m = _PID.search(line)
            if m:
                dead.setdefault("pid", m.group(1))
            m = _CODE.search(line)
            if m:
                dead.setdefault("code", m.group(1))

    threads = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dead_pid, dead_code = dead.get("pid"), dead.get("code")
    rc = proc.wait()
    if dead_pid is not None:
        rank = pids.get(dead_pid, "?")
        sig = f" (signal {dead_code})" if dead_code and int(dead_code) in (9, 15, 6, 11) else ""
        sys.stderr.write(f"tinylm: rank {rank} (pid {dead_pid}) ended abnormally, exit code {dead_code}{sig}; "
                         f"mpiexec stopped every rank\n")
    return rc


def strip_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N, argv without ``--nproc N`` / ``--nproc=N``)."""
    out, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = int(argv[i + 1]), i + 2
            continue
        if a.startswith("--nproc="):
            n, i = int(a.split("=", 1)[1]), i + 1
            continue
        out.append(a)
        i += 1
    return n, out


def relaunch_cli(n: int) -> int:
    """Re-run this ``tinylm ...`` command line under mpiexec, without ``--nproc``."""
    _, rest = strip_nproc(sys.argv[1:])
    return launch(n, [sys.executable, "-m", "tinylm.cli", *rest])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "-n" or "--" not in argv:
        print("usage: python -m tinylm.distributed.launch -n N -- COMMAND ...", file=sys.stderr)
        return 2
    return launch(int(argv[1]), argv[argv.index("--") + 1:])


if __name__ == "__main__":
    sys.exit(main())
