"""Build the guide: run every chapter's code, then write the HTML site and the PDF.

    python docs/guide/build.py [--quick] [--out DIR] [--only html|pdf] [--jobs N]

Needs the ``guide`` extra (``pip install -e '.[guide]'``: markdown-it-py, Pygments, ReportLab;
no LaTeX, no system libraries).

**Chapters** are ``docs/guide/NN-name.md``, in file order. A chapter may start with a comment
``<!-- needs: name, name -->`` naming earlier chapters whose work directories it reads (a
chapter that trains a model once; the next ones load it from ``../name/``).

**Every code block runs.** ```` ```python ```` blocks run in one namespace per chapter, in a
fresh process (docs/guide/_runner.py says what a block sees: ``QUICK``, ``figure``,
``quote``); ```` ```sh ```` blocks run with bash. What a block prints and the figures it makes
are put under it. A block that raises, or a shell block that exits non-zero, fails the build
with the chapter, line and traceback. Other fences (``text``, ``toml``, ``json``) are shown as
they are. Prose quotes numbers only as ``{{name}}``, filled in from ``quote(name, value)`` in
a block, which must also print that text: a number in the prose is always the one printed.

**Cache.** Each chapter's results are kept under ``OUT/cache/`` keyed by the chapter's text,
the mode, the chapters it needs, this builder, and the source of tinylm and kernels; a rebuild
after a one-chapter change reruns that chapter (and those that need it) only. A change to
tinylm reruns everything: a number the code no longer produces cannot survive a rebuild.

**Output**: ``OUT/html/index.html`` (a page per chapter, navigation, highlighted code) and
``OUT/guide.pdf`` (table of contents, numbered figures, page numbers, Appendix A: the core
source files, listed at build time). OUT defaults to ``docs/guide/_build`` (``_build-quick``
for ``--quick``).
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

GUIDE = Path(__file__).resolve().parent
ROOT = GUIDE.parent.parent
RUN_LANGS = ("python", "sh")
SOURCE_DIRS = ("tinylm", "kernels")
# Appendix A: the core of the stack, in the order the chapters build it
LISTING = ("tinylm/tensor.py", "tinylm/ops.py", "tinylm/functional.py", "tinylm/nn.py", "tinylm/models/base.py",
           "tinylm/models/cache.py", "tinylm/models/gpt.py", "tinylm/models/llama.py", "tinylm/optim/store.py",
           "tinylm/optim/adamw.py", "tinylm/optim/schedule.py", "tinylm/train/objectives.py", "tinylm/train/loop.py",
           "tinylm/generate.py", "tinylm/posttrain/dpo.py", "tinylm/tokenizer/train.py")
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
QUOTE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class BuildError(Exception):
    pass


@dataclass
class Block:
    lang: str
    code: str
    line: int
    run: bool


@dataclass
class Chapter:
    path: Path
    number: int
    name: str
    title: str
    needs: list[str]
    parts: list  # str (markdown) or Block, in order
    text: str = ""  # the file as parsed: the cache key is of this, not of a later edit
    result: dict = field(default_factory=dict)
    key: str = ""

    @property
    def blocks(self) -> list[Block]:
        return [p for p in self.parts if isinstance(p, Block) and p.run]


# ---- parsing ----------------------------------------------------------------------------------
def parse(path: Path, number: int) -> Chapter:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    needs: list[str] = []
    m = re.match(r"\s*<!--\s*needs:\s*(.*?)\s*-->", text)
    if m:
        needs = [x.strip() for x in m.group(1).split(",") if x.strip()]
    parts, prose, i = [], [], 0
    title = None
    while i < len(lines):
        line = lines[i]
        fm = FENCE.match(line)
        if fm and line.startswith("```") and fm.group(1) != "":
            lang = fm.group(1)
            start = i + 1
            j = start
            while j < len(lines) and lines[j].rstrip() != "```":
                j += 1
            if j == len(lines):
                raise BuildError(f"{path.name}:{i + 1}: a ``` fence that is never closed")
            if prose:
                parts.append("\n".join(prose))
                prose = []
            parts.append(Block(lang, "\n".join(lines[start:j]), i + 1, lang in RUN_LANGS))
            i = j + 1
            continue
        if title is None and line.startswith("# "):
            title = line[2:].strip()
        else:
            prose.append(line)
        i += 1
    if prose:
        parts.append("\n".join(prose))
    if title is None:
        raise BuildError(f"{path.name}: no '# Title' line")
    name = re.sub(r"^\d+-", "", path.stem)
    return Chapter(path, number, name, title, needs, parts, text)


def chapters(guide: Path = GUIDE) -> list[Chapter]:
    files = sorted(guide.glob("[0-9][0-9]-*.md"))
    out = [parse(p, i + 1) for i, p in enumerate(files)]
    names = [c.name for c in out]
    for c in out:
        for n in c.needs:
            if n not in names[: names.index(c.name)]:
                raise BuildError(f"{c.path.name}: needs {n!r}, which is not an earlier chapter")
    return out


# ---- running ----------------------------------------------------------------------------------
def source_hash() -> str:
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".html", ".jsonl", ".json", ".toml") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    h.update((ROOT / "pyproject.toml").read_bytes())
    return h.hexdigest()


def data_hash(guide: Path) -> str:
    """The guide's own inputs beside the chapters: ``data/`` and ``runs/`` (recorded long runs)."""
    h = hashlib.sha256()
    for d in ("data", "runs"):
        for p in sorted((guide / d).rglob("*")) if (guide / d).is_dir() else ():
            if p.is_file():
                h.update(str(p.relative_to(guide)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def chapter_key(ch: Chapter, quick: bool, src: str, dep_keys: list[str]) -> str:
    h = hashlib.sha256()
    for part in (ch.text.encode("utf-8"), b"quick" if quick else b"full", src.encode(), data_hash(ch.path.parent).encode(),
                 (GUIDE / "build.py").read_bytes(), (GUIDE / "_runner.py").read_bytes(), *[k.encode() for k in dep_keys]):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def run_chapters(chs: list[Chapter], out: Path, quick: bool, log=print) -> dict:
    """Run (or take from the cache) every chapter; returns {name: "ran" | "cached"}."""
    src = source_hash()
    keys: dict[str, str] = {}
    what = {}
    for ch in chs:
        ch.key = chapter_key(ch, quick, src, [keys[n] for n in ch.needs])
        keys[ch.name] = ch.key
        cache = out / "cache" / ch.name
        work = out / "work" / ch.name
        done = cache / ch.key / "result.json"
        deps_ran = any(what.get(n) == "ran" for n in ch.needs)
        if done.is_file() and work.is_dir() and not deps_ran:
            ch.result = json.loads(done.read_text(encoding="utf-8"))
            what[ch.name] = "cached"
            log(f"  {ch.number:2d} {ch.name}: cached")
            continue
        for d in (cache, work):
            shutil.rmtree(d, ignore_errors=True)
        (cache / ch.key).mkdir(parents=True)
        work.mkdir(parents=True)
        job = {"chapter": ch.path.stem, "quick": quick, "fig_dir": str(cache / ch.key),
               "result": str(cache / ch.key / "result.tmp"),
               "blocks": [{"lang": b.lang, "code": b.code, "line": b.line} for b in ch.blocks]}
        job_path = cache / ch.key / "job.json"
        job_path.write_text(json.dumps(job), encoding="utf-8")
        t0 = time.perf_counter()
        env = dict(os.environ, TINYLM_GUIDE_DIR=str(ch.path.parent), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        p = subprocess.run([sys.executable, str(GUIDE / "_runner.py"), str(job_path)], cwd=work, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        res_path = cache / ch.key / "result.tmp"
        if p.returncode or not res_path.is_file():
            raise BuildError(f"{ch.path.name}: the runner failed (exit {p.returncode}):\n{p.stdout[-4000:]}")
        res = json.loads(res_path.read_text(encoding="utf-8"))
        if res["error"]:
            b = ch.blocks[res["error"]["block"]]
            raise BuildError(f"{ch.path.name}:{b.line}: this {b.lang} block failed:\n{res['error']['traceback']}")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res_path.replace(done)
        ch.result = res
        what[ch.name] = "ran"
        log(f"  {ch.number:2d} {ch.name}: ran in {res['seconds']:.1f} s")
    return what


def fill_quotes(ch: Chapter, text: str) -> str:
    quotes = ch.result.get("quotes", {})

    def sub(m):
        name = m.group(1)
        if name not in quotes:
            raise BuildError(f"{ch.path.name}: the prose quotes {{{{{name}}}}}, which no block quote()d")
        return quotes[name]["text"]

    return QUOTE.sub(sub, text)


def rendered_parts(ch: Chapter):
    """(kind, ...) in order: ("md", text) with quotes filled, ("code", Block, stdout, figures)."""
    results = ch.result.get("blocks", [])
    k = 0
    for part in ch.parts:
        if isinstance(part, str):
            yield "md", fill_quotes(ch, part)
        elif part.run:
            r = results[k]
            k += 1
            yield "code", part, r["stdout"], r["figures"]
        else:
            yield "code", part, None, []


def figure_numbers(ch: Chapter) -> dict:
    """file -> "Figure N.k" for the chapter's figures, in order."""
    out, k = {}, 0
    for r in ch.result.get("blocks", []):
        for f in r["figures"]:
            k += 1
            out[f["file"]] = f"Figure {ch.number}.{k}"
    return out


# ---- HTML -------------------------------------------------------------------------------------
CSS = """
body { margin: 0; font: 16px/1.55 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d1d1f; }
nav { position: fixed; top: 0; left: 0; bottom: 0; width: 260px; overflow-y: auto; background: #f6f6f8;
      border-right: 1px solid #ddd; padding: 18px 14px; font-size: 14px; box-sizing: border-box; }
nav a { display: block; color: #333; text-decoration: none; padding: 3px 4px; border-radius: 4px; }
nav a.here { background: #dde6f7; font-weight: 600; }
main { margin-left: 260px; max-width: 860px; padding: 24px 40px 80px; }
pre { background: #f5f5f7; border: 1px solid #e2e2e6; border-radius: 6px; padding: 10px 12px; overflow-x: auto;
      font: 13px/1.4 "DejaVu Sans Mono", Menlo, Consolas, monospace; }
pre.output { background: #fffdf3; border-color: #eee3b8; }
pre.output::before { content: "output"; display: block; font-size: 11px; color: #a08a3c; margin-bottom: 4px; }
code { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em; }
figure { margin: 16px 0; text-align: center; } figure img { max-width: 100%; }
figcaption { font-size: 14px; color: #555; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
.pager { display: flex; justify-content: space-between; margin-top: 40px; }
"""


def _md():
    from markdown_it import MarkdownIt  # noqa: PLC0415

    return MarkdownIt("commonmark").enable("table")


def highlight_html(code: str, lang: str) -> str:
    from pygments import highlight  # noqa: PLC0415
    from pygments.formatters import HtmlFormatter  # noqa: PLC0415
    from pygments.lexers import TextLexer, get_lexer_by_name  # noqa: PLC0415

    try:
        lexer = get_lexer_by_name({"sh": "bash"}.get(lang, lang))
    except Exception:  # noqa: BLE001 - an unknown language is shown as plain text
        lexer = TextLexer()
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


def write_html(chs: list[Chapter], out: Path, listing: list[tuple[str, str]]) -> Path:
    from pygments.formatters import HtmlFormatter  # noqa: PLC0415

    site = out / "html"
    shutil.rmtree(site, ignore_errors=True)
    (site / "figures").mkdir(parents=True)
    (site / "style.css").write_text(CSS + HtmlFormatter().get_style_defs("pre"), encoding="utf-8")
    md = _md()
    pages = [(f"{c.number:02d}-{c.name}.html", f"{c.number}. {c.title}") for c in chs] + \
            [("appendix-a.html", "Appendix A: Full code listing")]

    def page(fname, title, body):
        navs = "".join(f'<a href="{f}"{" class=here" if f == fname else ""}>{html.escape(t)}</a>' for f, t in pages)
        i = [f for f, _ in pages].index(fname) if fname in [f for f, _ in pages] else -1
        prev = f'<a href="{pages[i - 1][0]}">← {html.escape(pages[i - 1][1])}</a>' if i > 0 else "<span></span>"
        nxt = f'<a href="{pages[i + 1][0]}">{html.escape(pages[i + 1][1])} →</a>' if 0 <= i < len(pages) - 1 else ""
        (site / fname).write_text(
            f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="stylesheet" href="style.css"></head><body><nav><a href="index.html"><b>Build a Large '
            f'Language Model from Scratch</b></a><hr>{navs}</nav><main>{body}<div class="pager">{prev}{nxt}</div>'
            f'</main></body></html>', encoding="utf-8")

    toc = "".join(f'<li><a href="{f}">{html.escape(t)}</a></li>' for f, t in pages)
    page("index.html", "Build a Large Language Model from Scratch",
         f"<h1>Build a Large Language Model from Scratch</h1><p>with tinylm. Every output and figure in these "
         f"pages was produced by running the code shown, at build time.</p><ol>{toc}</ol>")
    for ch, (fname, _) in zip(chs, pages):
        nums = figure_numbers(ch)
        body = [f"<h1>{ch.number}. {html.escape(ch.title)}</h1>"]
        for kind, *rest in rendered_parts(ch):
            if kind == "md":
                body.append(md.render(rest[0]))
                continue
            block, stdout, figs = rest
            body.append(f'<pre class="code">{highlight_html(block.code, block.lang)}</pre>')
            if stdout:
                body.append(f'<pre class="output">{html.escape(stdout.rstrip())}</pre>')
            for f in figs:
                dst = f"{ch.name}-{f['file']}"
                shutil.copy(out / "cache" / ch.name / ch.key / f["file"], site / "figures" / dst)
                body.append(f'<figure><img src="figures/{dst}" alt="{html.escape(f["caption"])}"><figcaption>'
                            f'{nums[f["file"]]}: {html.escape(f["caption"])}</figcaption></figure>')
        page(fname, ch.title, "\n".join(body))
    body = ["<h1>Appendix A: Full code listing</h1><p>The core files, as they were when this guide was built.</p>"]
    for rel, text in listing:
        body.append(f"<h2>{html.escape(rel)}</h2><pre>{highlight_html(text, 'python')}</pre>")
    page("appendix-a.html", "Appendix A", "\n".join(body))
    return site / "index.html"


# ---- PDF --------------------------------------------------------------------------------------
def build_pdf(chs: list[Chapter], out: Path, listing: list[tuple[str, str]]) -> Path:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("tinylm_guide_pdf", GUIDE / "guide_pdf.py")
    pdf = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pdf
    spec.loader.exec_module(pdf)
    try:
        return pdf.write_pdf(chs, out, listing, rendered_parts, figure_numbers, _md())
    except pdf.PdfError as e:
        raise BuildError(str(e)) from None


def build(out: Path, quick: bool, only: str | None = None, names: list[str] | None = None, guide: Path = GUIDE,
          log=print, listing_files=LISTING) -> dict:
    """Run the chapters (those named and the ones they need; default all) and write the
    outputs. Returns {"chapters", "ran" (name -> "ran" | "cached"), "html", "pdf"}. Raises
    BuildError."""
    out.mkdir(parents=True, exist_ok=True)
    chs = chapters(guide)
    if names:
        want = set(names)
        unknown = want - {c.name for c in chs}
        if unknown:
            raise BuildError(f"--chapters: no chapter named {', '.join(sorted(unknown))}")
        for c in reversed(chs):
            if c.name in want:
                want |= set(c.needs)
        chs = [c for c in chs if c.name in want]
    log(f"running {len(chs)} chapters ({'quick' if quick else 'full'}) into {out}")
    ran = run_chapters(chs, out, quick, log)
    for ch in chs:
        for _ in rendered_parts(ch):  # every {{quote}} resolves before anything is written
            pass
    listing = [(rel, (ROOT / rel).read_text(encoding="utf-8")) for rel in listing_files]
    res = {"chapters": chs, "ran": ran, "html": None, "pdf": None}
    if only != "pdf":
        res["html"] = write_html(chs, out, listing)
        log(f"html: {res['html']}")
    if only != "html":
        res["pdf"] = build_pdf(chs, out, listing)
        log(f"pdf: {res['pdf']}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Build the tinylm guide (HTML and PDF).")
    ap.add_argument("--quick", action="store_true", help="tiny settings (every block still runs): for CI")
    ap.add_argument("--out", type=Path, help="output directory (default docs/guide/_build[-quick])")
    ap.add_argument("--only", choices=("html", "pdf"), help="write only this output")
    ap.add_argument("--chapters", help="comma-separated chapter names to build (and those they need)")
    args = ap.parse_args(argv)
    out = args.out or GUIDE / ("_build-quick" if args.quick else "_build")
    import importlib.util  # noqa: PLC0415

    lacking = [m for m in ("markdown_it", "pygments", "reportlab") if importlib.util.find_spec(m) is None]
    if lacking:
        print(f"guide build: {', '.join(lacking)} not installed; install the guide extra: "
              f"pip install -e '.[guide]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        build(out, args.quick, args.only, args.chapters.split(",") if args.chapters else None)
    except BuildError as e:
        print(f"guide build failed: {e}", file=sys.stderr)
        return 1
    print(f"built in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
