"""Communicators: what data parallelism and ZeRO need from a network, over three backends.

A ``Communicator`` offers non-blocking collectives on flat arrays (``iallreduce``,
``ireduce_scatter``, ``iallgather``, ``igather``: each returns a handle), one ``wait`` for
handles, and a few blocking conveniences built on them (``allreduce``, ``barrier``,
``bcast_json``). Every collective *sums*; callers divide. Counts are per rank, so a rank's
part of a range may be empty and the last rank's part shorter (tinylm.distributed.shard
computes them).

- ``SingleProcess``: one rank; every collective is a copy or nothing.
- ``MPIComm`` (mpi4py, the ``mpi`` extra): the buffer (uppercase) methods on NumPy arrays
  only, never the pickling lowercase ones. ``wait`` polls with a deadline: a collective that
  does not complete within ``timeout`` seconds (another rank died, raised, or stopped calling)
  prints which rank gave up on what, and aborts every rank (``MPI_Abort``), so a failure is
  never a hang. An uncaught exception, or an exit before ``done()``, aborts the job the same
  way, naming the rank.
- ``NCCLComm`` (CuPy's NCCL bindings, bootstrapped over MPI): the same collectives on CuPy
  arrays on one GPU per rank. No machine this project runs on has a GPU, so it has never run:
  it is a small skeleton kept import-guarded, for someone with GPUs to finish and test.

Why polling: MPICH progresses a non-blocking collective only inside MPI calls, so ``poke()``
(an ``MPI_Testall``) is called from the backward hooks; a blocking ``MPI_Wait`` could never
time out.

References: the MPI 4.0 standard, chapter 6 (collectives, ``MPI_IN_PLACE``); mpi4py's
tutorial (buffer-based communication).
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
import traceback

import numpy as np

DEFAULT_TIMEOUT = 600.0  # seconds a collective may take: first steps include Numba compiles


class Handle:
    """One collective in flight: the backend's request, a name for messages, and what to do
    once it completes (``then``)."""

    __slots__ = ("req", "what", "then", "keep")

    def __init__(self, req, what: str, then=None, keep=None):
        self.req, self.what, self.then, self.keep = req, what, then, keep


class Communicator:
    """The protocol every backend implements (SingleProcess doubles as its reference)."""

    rank = 0
    size = 1
    backend = "single"

    # ---- non-blocking collectives on flat arrays: sums --------------------------------------
    def iallreduce(self, buf, what="allreduce") -> Handle:
        """Sum ``buf`` over ranks, in place."""
        return Handle(None, what)

    def ireduce_scatter(self, send, recv, counts, what="reduce_scatter") -> Handle:
        """Sum ``send`` (len = sum(counts)) over ranks; rank r receives elements
        [sum(counts[:r]), sum(counts[:r+1])) into ``recv`` (len counts[r])."""
        recv[...] = send[: counts[0]]
        return Handle(None, what)

    def ireduce_scatter_inplace(self, buf, counts, what="reduce_scatter") -> Handle:
        """As ``ireduce_scatter`` with ``buf`` as input; rank r's sum lands in buf[:counts[r]]."""
        return Handle(None, what)

    def iallgather(self, send, recv, counts, displs, what="allgather") -> Handle:
        """Rank r's ``send`` (len counts[r]) goes to recv[displs[r]:displs[r]+counts[r]] on all."""
        recv[displs[0]: displs[0] + counts[0]] = send
        return Handle(None, what)

    def iallgather_inplace(self, buf, counts, displs, what="allgather") -> Handle:
        """As ``iallgather`` with every rank's part already in place in ``buf``."""
        return Handle(None, what)

    def igather(self, send, recv, counts, displs, root=0, what="gather") -> Handle:
        """As ``iallgather``, but only ``root`` receives (``recv`` may be None elsewhere)."""
        recv[displs[0]: displs[0] + counts[0]] = send
        return Handle(None, what)

    def wait(self, handles) -> None:
        for h in handles:
            if h.then is not None:
                h.then()

    def poke(self, handles) -> list:
        """Drive progress; return the handles still in flight (their ``then`` run when done)."""
        self.wait(handles)
        return []

    # ---- blocking conveniences ---------------------------------------------------------------
    def allreduce(self, values, what="allreduce") -> np.ndarray:
        """Sum of a small float64 vector over ranks."""
        buf = np.array(values, dtype=np.float64).reshape(-1)
        self.wait([self.iallreduce(buf, what)])
        return buf

    def barrier(self, what="barrier") -> None:
        self.allreduce([0.0], what)

    def bcast_json(self, obj=None, root=0, what="broadcast"):
        """``obj`` from ``root`` to every rank, as JSON bytes (no pickle)."""
        return obj

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)

    def done(self) -> None:
        """The program finished normally on this rank (an exit before this aborts the job)."""


class SingleProcess(Communicator):
    """One process, no communication: every collective is the identity (or a copy)."""


class MPIComm(Communicator):
    backend = "mpi"

    def __init__(self, timeout: float | None = None, comm=None):
        from mpi4py import MPI  # noqa: PLC0415 (optional extra)

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(os.environ.get("TINYLM_COMM_TIMEOUT", timeout or DEFAULT_TIMEOUT))
        self._done = False
        self._install_fault_handlers()
        self.table = self._rank_table()
        if self.rank == 0 and self.size > 1:  # how a PID in mpiexec's messages maps to a rank (launch.py)
            print("tinylm: ranks: " + " ".join(f"{r}={t}" for r, t in enumerate(self.table)), file=sys.stderr,
                  flush=True)

    def _rank_table(self) -> list[str]:
        """Every rank's ``pid@host``, gathered as fixed-width bytes (no pickle)."""
        import socket  # noqa: PLC0415

        width = 96
        me = np.zeros(width, dtype=np.uint8)
        raw = f"{os.getpid()}@{socket.gethostname()}".encode()[:width]
        me[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        allb = np.zeros(width * self.size, dtype=np.uint8)
        counts = [width] * self.size
        self.wait([self.iallgather(me, allb, counts, [width * r for r in range(self.size)], "rank table")])
        return [bytes(allb[r * width:(r + 1) * width]).rstrip(b"\0").decode(errors="replace") for r in range(self.size)]

    # ---- faults: never a hang ------------------------------------------------------------------
    def _install_fault_handlers(self):
        prev = sys.excepthook

        def hook(etype, value, tb):
            if issubclass(etype, KeyboardInterrupt):
                return prev(etype, value, tb)
            text = "".join(traceback.format_exception(etype, value, tb))
            self.abort(f"tinylm: rank {self.rank} of {self.size} failed; aborting every rank:\n{text}")

        sys.excepthook = hook
        atexit.register(self._at_exit)

    def _at_exit(self):
        if not self._done and self.size > 1:
            self.abort(f"tinylm: rank {self.rank} of {self.size} is exiting before the end of the run "
                       f"(an error above?); aborting every rank")

    def done(self):
        self._done = True

    def abort(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr, flush=True)
        sys.stderr.flush()
        # MPI_Abort kills every rank at once, and mpiexec's I/O forwarding can lose output still in
        # flight: seen here once in ~10 runs, the failing rank's message never reached the terminal.
        # A short pause lets it be forwarded first; an abort is rare and the job is ending anyway.
        time.sleep(0.5)
        self.comm.Abort(code)

    def set_timeout(self, seconds: float) -> None:
        if seconds and seconds > 0 and "TINYLM_COMM_TIMEOUT" not in os.environ:
            self.timeout = float(seconds)

    # ---- collectives ----------------------------------------------------------------------------
    @staticmethod
    def _buf(a, counts=None, displs=None):  # mpi4py infers the MPI datatype from the array
        return a if counts is None else [a, (list(map(int, counts)), list(map(int, displs)))]

    def iallreduce(self, buf, what="allreduce"):
        return Handle(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, self.MPI.SUM), what, keep=buf)

    def ireduce_scatter(self, send, recv, counts, what="reduce_scatter"):
        req = self.comm.Ireduce_scatter(send, recv, list(map(int, counts)), self.MPI.SUM)
        return Handle(req, what, keep=(send, recv))

    def ireduce_scatter_inplace(self, buf, counts, what="reduce_scatter"):
        req = self.comm.Ireduce_scatter(self.MPI.IN_PLACE, buf, list(map(int, counts)), self.MPI.SUM)
        return Handle(req, what, keep=buf)

    def iallgather(self, send, recv, counts, displs, what="allgather"):
        req = self.comm.Iallgatherv(send, self._buf(recv, counts, displs))
        return Handle(req, what, keep=(send, recv))

    def iallgather_inplace(self, buf, counts, displs, what="allgather"):
        req = self.comm.Iallgatherv(self.MPI.IN_PLACE, self._buf(buf, counts, displs))
        return Handle(req, what, keep=buf)

    def igather(self, send, recv, counts, displs, root=0, what="gather"):
        rb = self._buf(recv, counts, displs) if self.rank == root else None
        return Handle(self.comm.Igatherv(send, rb, root), what, keep=(send, recv))

    def poke(self, handles):
        if not handles:
            return []
        left = []
        for h in handles:
            if h.req.Test():
                if h.then is not None:
                    h.then()
            else:
                left.append(h)
        return left

    def wait(self, handles):
        """Wait for every handle, or abort the job when ``timeout`` passes."""
        handles = [h for h in handles if h is not None]
        deadline = time.monotonic() + self.timeout
        nap = 0.0
        while handles:
            handles = self.poke(handles)
            if not handles:
                break
            if time.monotonic() > deadline:
                self.abort(f"tinylm: rank {self.rank} of {self.size}: {handles[0].what} did not complete within "
                           f"{self.timeout:.0f} s (another rank failed, was killed, or stopped calling it); "
                           f"aborting every rank")
            if nap:
                time.sleep(nap)
            nap = min(1e-3, nap * 2 if nap else 2e-5)  # spin briefly, then back off (cores may be shared)

    def bcast_json(self, obj=None, root=0, what="broadcast"):
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8) if self.rank == root else None
        n = np.array([0 if data is None else data.size], dtype=np.int64)
        self.wait([Handle(self.comm.Ibcast(n, root), what)])
        buf = data.copy() if self.rank == root else np.empty(int(n[0]), dtype=np.uint8)
        self.wait([Handle(self.comm.Ibcast(buf, root), what)])
        return json.loads(buf.tobytes().decode())


class NCCLComm(MPIComm):
    """NCCL over CuPy for CuPy arrays, one GPU per rank; MPI carries the unique id and every
    control message. UNTESTED: no machine this project runs on has a GPU. A collective is
    enqueued on one stream; ``wait`` polls an event with the same deadline as MPIComm."""

    backend = "nccl"

    def __init__(self, timeout: float | None = None):
        super().__init__(timeout)
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415

        self.cp, self.nccl = cupy, nccl
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", self.rank)))
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
        uid = self.bcast_json(list(nccl.get_unique_id()) if self.rank == 0 else None)
        self.nc = nccl.NcclCommunicator(self.size, tuple(uid), self.rank)
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def _dt(self, a):
        n = self.nccl
        return {"float32": n.NCCL_FLOAT32, "float64": n.NCCL_FLOAT64, "float16": n.NCCL_FLOAT16}[a.dtype.name]

    def _event(self, what, keep):
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.stream)
        return Handle(_EventReq(ev), what, keep=keep)

    def iallreduce(self, buf, what="allreduce"):
        if not hasattr(buf, "data"):  # a small NumPy vector (losses, flags): over MPI
            return super().iallreduce(buf, what)
        self.nc.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dt(buf), self.nccl.NCCL_SUM, self.stream.ptr)
        return self._event(what, buf)

    def ireduce_scatter(self, send, recv, counts, what="reduce_scatter"):
        # NCCL's reduce-scatter has equal counts: reduce the whole range, keep this rank's part
        tmp = send.copy()
        self.nc.allReduce(tmp.data.ptr, tmp.data.ptr, tmp.size, self._dt(tmp), self.nccl.NCCL_SUM, self.stream.ptr)
        lo = int(sum(counts[: self.rank]))
        with self.stream:
            recv[...] = tmp[lo: lo + counts[self.rank]]
        return self._event(what, (tmp, recv))

    def ireduce_scatter_inplace(self, buf, counts, what="reduce_scatter"):
        lo = int(sum(counts[: self.rank]))
        self.nc.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dt(buf), self.nccl.NCCL_SUM, self.stream.ptr)
        with self.stream:
            buf[: counts[self.rank]] = buf[lo: lo + counts[self.rank]].copy()
        return self._event(what, buf)

    def iallgather(self, send, recv, counts, displs, what="allgather"):
        # unequal parts: each rank broadcasts its own (NCCL groups would batch these)
        for r in range(self.size):
            if counts[r]:
                part = recv[displs[r]: displs[r] + counts[r]]
                if r == self.rank:
                    with self.stream:
                        part[...] = send
                self.nc.bcast(part.data.ptr, part.size, self._dt(part), r, self.stream.ptr)
        return self._event(what, (send, recv))

    def iallgather_inplace(self, buf, counts, displs, what="allgather"):
        for r in range(self.size):
            if counts[r]:
                part = buf[displs[r]: displs[r] + counts[r]]
                self.nc.bcast(part.data.ptr, part.size, self._dt(part), r, self.stream.ptr)
        return self._event(what, buf)

    def igather(self, send, recv, counts, displs, root=0, what="gather"):
        full = self.cp.zeros(int(sum(counts)), dtype=send.dtype)
        self.iallgather(send, full, counts, displs, what)
        if self.rank == root:
            with self.stream:
                recv[...] = full
        return self._event(what, (send, full))


class _EventReq:
    def __init__(self, ev):
        self.ev = ev

    def Test(self):  # noqa: N802 (the MPI request's name)
        return self.ev.done


def _launched_world_size() -> int:
    """The number of ranks mpiexec (MPICH's Hydra, Open MPI, SLURM's PMI) says this job has."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return 1


def _local_ranks() -> int:
    for key in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(key)
        if v and v.isdigit():
            return int(v)
    return _launched_world_size()


_WORLD = None


def world(timeout: float | None = None, backend: str = "auto"):
    """The job's communicator, or None for a single process (today's code path exactly).

    Under ``mpiexec -n N`` (N > 1): an MPIComm (NCCLComm with ``backend="nccl"``). It also
    sets this rank's default thread count to cores / ranks on this machine (TINYLM_NUM_THREADS,
    unless given) and sends ranks other than 0 to a silent stdout, so a run prints once."""
    global _WORLD
    if _WORLD is not None:
        if timeout:
            _WORLD.set_timeout(timeout)
        return _WORLD
    if _launched_world_size() <= 1:
        return None
    if "TINYLM_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["TINYLM_NUM_THREADS"] = str(max(1, cores // max(1, _local_ranks())))
    try:
        _WORLD = NCCLComm(timeout) if backend == "nccl" else MPIComm(timeout)
    except ImportError as e:
        raise RuntimeError(f"launched on {_launched_world_size()} ranks but mpi4py is not importable ({e}); "
                           f"install the extra: pip install 'tinylm[mpi]'") from None
    if _WORLD.size <= 1:
        _WORLD.done()
        _WORLD = None
        return None
    if _WORLD.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return _WORLD
