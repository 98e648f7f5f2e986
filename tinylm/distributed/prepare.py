"""``tinylm prepare`` under mpiexec: the clean pass's batches are split across ranks.

The pipeline (tinylm/data/pipeline.py) already keeps every decision that depends on earlier
documents (duplicates: first occurrence wins; the split fallback) in one place, taking the
workers' results back in input order. Ranks are more workers of the same kind: every rank
reads the same inputs into the same batches; batch i is cleaned (clean, filter, exact key,
split hash, MinHash signature) by rank i mod N; rank 0 takes the results back in order and
does everything else exactly as one process does: deduplication (across all ranks' documents,
since all decisions are made there), the tokenizer, tokenization, the shards and the manifest.
So the output is byte-identical to a single process's (tested at 1 and 2 ranks). Every rank
returns the report.

Messages are point-to-point buffers (no pickle): a length, then JSON (documents, stats) plus
the signatures' raw uint32 bytes.

Leaves out: splitting the tokenize pass across ranks (rank 0 tokenizes; with ``workers`` it
may use a process pool as usual).
"""
from __future__ import annotations

import json

import numpy as np

_HEAD = 8  # bytes of the JSON part's length at the front of a message


def encode_clean(result) -> np.ndarray:
    """A ``_clean_batch`` result -> uint8 buffer."""
    out, stats, raw = result
    docs, sigs = [], []
    for r in out:
        if r is None:
            docs.append(None)
            continue
        text, key, u, sig, src, line = r
        docs.append([text, int(key), float(u), None if sig is None else int(sig.size), src, line])
        if sig is not None:
            sigs.append(np.ascontiguousarray(sig, dtype=np.uint32))
    head = json.dumps({"docs": docs, "stats": stats, "raw": raw}).encode()
    tail = np.concatenate(sigs).view(np.uint8) if sigs else np.zeros(0, np.uint8)
    buf = np.empty(_HEAD + len(head) + tail.size, dtype=np.uint8)
    buf[:_HEAD] = np.frombuffer(np.array([len(head)], dtype="<u8").tobytes(), dtype=np.uint8)
    buf[_HEAD: _HEAD + len(head)] = np.frombuffer(head, dtype=np.uint8)
    buf[_HEAD + len(head):] = tail
    return buf


def decode_clean(buf: np.ndarray):
    n = int(np.frombuffer(buf[:_HEAD].tobytes(), dtype="<u8")[0])
    d = json.loads(buf[_HEAD: _HEAD + n].tobytes().decode())
    sigs = buf[_HEAD + n:].view(np.uint32) if buf.size > _HEAD + n else np.zeros(0, np.uint32)
    out, at = [], 0
    for r in d["docs"]:
        if r is None:
            out.append(None)
            continue
        text, key, u, k, src, line = r
        sig = None
        if k is not None:
            sig, at = sigs[at: at + k].copy(), at + k
        out.append((text, key, u, sig, src, line))
    return out, d["stats"], d["raw"]


def _send(comm, buf: np.ndarray, tag: int):
    from tinylm.distributed.comm import Handle  # noqa: PLC0415

    n = np.array([buf.size], dtype=np.int64)
    comm.wait([Handle(comm.comm.Isend(n, 0, 2 * tag), f"send of clean batch {tag}", keep=n),
               Handle(comm.comm.Isend(buf, 0, 2 * tag + 1), f"send of clean batch {tag}", keep=buf)])


def _recv(comm, src: int, tag: int) -> np.ndarray:
    from tinylm.distributed.comm import Handle  # noqa: PLC0415

    n = np.zeros(1, dtype=np.int64)
    comm.wait([Handle(comm.comm.Irecv(n, src, 2 * tag), f"clean batch {tag} from rank {src}")])
    buf = np.empty(int(n[0]), dtype=np.uint8)
    comm.wait([Handle(comm.comm.Irecv(buf, src, 2 * tag + 1), f"clean batch {tag} from rank {src}")])
    return buf


class MPIRunner:
    """Rank 0's runner: ``map`` of the clean pass yields every batch's result in order,
    cleaning its own share; any other function runs here (tokenize pass)."""

    pool = None

    def __init__(self, comm, cfg):
        from tinylm.data import pipeline  # noqa: PLC0415

        self.comm, self.pipeline = comm, pipeline
        pipeline._init_worker(cfg)

    def map(self, fn, items):
        if fn is not self.pipeline._clean_batch:
            yield from map(fn, items)
            return
        n = self.comm.size
        for i, item in enumerate(items):
            if i % n == 0:
                yield fn(item)
            else:
                yield decode_clean(_recv(self.comm, i % n, i))

    def close(self):
        self.pipeline._W.clear()

    terminate = close


def serve_clean(comm, files, cfg) -> dict:
    """A rank other than 0: clean this rank's share of the batches, send each to rank 0, and
    return the report rank 0 broadcasts at the end."""
    from tinylm.data import pipeline  # noqa: PLC0415
    from tinylm.data.sources import Issues, iter_documents  # noqa: PLC0415

    pipeline._init_worker(cfg)
    docs = iter_documents(files, cfg.sources, Issues())
    for i, batch in enumerate(pipeline._batches(docs, cfg.batch_bytes)):
        if i % comm.size == comm.rank:
            _send(comm, encode_clean(pipeline._clean_batch(batch)), i)
    pipeline._W.clear()
    return finish(comm, None)


def finish(comm, report):
    """Rank 0's report to every rank (rank 0 may spend long on the tokenizer and shards: the
    wait's deadline is a day, and a failure on rank 0 aborts the job anyway)."""
    comm.timeout, old = max(comm.timeout, 86400.0), comm.timeout
    report = comm.bcast_json(report, 0, "prepare report")
    comm.timeout = old
    comm.done()
    return report
