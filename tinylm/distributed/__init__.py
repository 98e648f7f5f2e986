"""Data-parallel training over several processes: communicators, gradient buckets, ZeRO 0-3.

    comm.py    Communicator: SingleProcess, MPIComm (mpi4py), NCCLComm (CuPy; untested here);
               world() -> the job's communicator under mpiexec, or None for one process
    shard.py   which rank owns which range of each flat buffer (written once, used by 1-3)
    ddp.py     gradient buckets, and hooks that say during backward when each is complete
    zero.py    ZeroOptimizer: AdamW with ZeRO stage 0, 1, 2 or 3 over a ParamStore
    hooks.py   what the Trainer calls on several ranks (global loss, consolidated checkpoints)
    launch.py  `tinylm train --nproc N`: re-run the command under mpiexec

Run ``mpiexec -n N tinylm train ...`` (README, "Distributed training").
"""
from tinylm.distributed.comm import Communicator, MPIComm, SingleProcess, world
from tinylm.distributed.shard import Layout

__all__ = ["Communicator", "Layout", "MPIComm", "SingleProcess", "world"]
