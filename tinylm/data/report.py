"""The report of a ``prepare`` run: built from the pass summaries, stored in the manifest,
and printed as a few lines at the end of ``tinylm prepare``.

Report keys: ``input`` (files, bytes, documents, characters), ``cleaned`` (documents each
cleaning step changed), ``redacted`` (replacements per kind), ``dropped`` (documents per
filter), ``dedup`` (mode, duplicates found, index memory, up to 20 examples with file and line
of the copy and of the document it duplicates), ``kept``, ``split`` (documents, tokens and
tokens per shard for train and val), ``issues`` (bad input by kind, first 200 with file and
line), ``warnings``, ``seconds`` per pass and ``mb_per_s`` end to end.
"""
from __future__ import annotations

from dataclasses import asdict


def short_issues(issues: Issues, p1: dict) -> str:
    dropped = {k[8:]: v for k, v in p1["stats"].items() if k.startswith("dropped.")}
    return (f"{p1['documents']} documents read, dropped by filters {dropped}, "
            f"{p1['exact_duplicates'] + p1['near_duplicates']} duplicates, input issues {issues.counts}")


def settings_dict(cfg: PrepareConfig) -> dict:
    d = asdict(cfg)
    d["sources"]["include"] = list(cfg.sources.include)
    d["sources"]["exclude"] = list(cfg.sources.exclude)
    return d


def build_report(files, total_bytes, p1, issues, writers, cfg, warnings, times) -> dict:
    t0, t1, t2, t3 = times
    stats = p1["stats"]
    pick = lambda prefix: {k[len(prefix):]: v for k, v in sorted(stats.items()) if k.startswith(prefix)}
    split = {}
    for name, w in writers.items():
        split[name] = {"documents": w.documents, "tokens": int(w.tokens), "shards": len(w.shards),
                       "tokens_per_shard": [s["tokens"] for s in w.shards]}
    if split["train"]["documents"] == 0:
        warnings.append("the train split is empty")
    dedup = {"mode": cfg.dedup, "exact_duplicates": p1["exact_duplicates"],
             "near_duplicates": p1["near_duplicates"], "index_bytes": int(p1["index_bytes"]),
             "examples": p1["dedup_examples"]}
    if "lsh" in p1:
        dedup.update(near_candidates_verified=p1["near_candidates"], lsh=p1["lsh"],
                     threshold=cfg.near_threshold, num_perm=cfg.num_perm, shingle_words=cfg.shingle)
    total = t3 - t0
    return {
        "input": {"files": len(files), "bytes": total_bytes, "documents": p1["documents"], "chars": p1["chars_read"]},
        "cleaned": pick("cleaned."),
        "redacted": pick("redacted."),
        "dropped": pick("dropped."),
        "dedup": dedup,
        "kept": {"documents": p1["kept"], "chars": p1["kept_chars"]},
        "split": split,
        "issues": issues.as_dict(),
        "warnings": warnings,
        "seconds": {"clean_dedup": round(t1 - t0, 3), "tokenizer": round(t2 - t1, 3),
                    "tokenize_shards": round(t3 - t2, 3), "total": round(total, 3)},
        "mb_per_s": round(total_bytes / 1e6 / total, 3) if total > 0 else None,
    }


def format_report(report: dict) -> str:
    """A few readable lines for the terminal (the full report is in manifest.json)."""
    inp, kept, sp = report["input"], report["kept"], report["split"]
    lines = [
        f"read      {inp['files']} files, {inp['bytes'] / 1e6:.2f} MB, {inp['documents']} documents",
        f"dropped   {report['dropped'] or 'none'}",
        f"dedup     {report['dedup']['mode']}: {report['dedup']['exact_duplicates']} exact, "
        f"{report['dedup']['near_duplicates']} near duplicates",
        f"kept      {kept['documents']} documents, {kept['chars'] / 1e6:.2f} M chars",
        f"train     {sp['train']['documents']} documents, {sp['train']['tokens']} tokens, {sp['train']['shards']} shards",
        f"val       {sp['val']['documents']} documents, {sp['val']['tokens']} tokens, {sp['val']['shards']} shards",
        f"time      {report['seconds']['total']:.2f} s ({report['mb_per_s']} MB/s)",
    ]
    if report["redacted"]:
        lines.insert(2, f"redacted  {report['redacted']}")
    if report["issues"]["total"]:
        lines.append(f"issues    {report['issues']['counts']}")
        for r in report["issues"]["records"][:10]:
            lines.append(f"  {r['kind']}: {r['file']}:{r['line']}: {r['detail']}")
    lines += [f"warning   {w}" for w in report["warnings"]]
    return "\n".join(lines)
