"""The guide's builder (docs/guide/build.py): every block runs, prose numbers come only from
printed output, the cache reruns only what changed, and the quick build of the real guide
produces every chapter and figure in both outputs."""
from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide"

pytest.importorskip("markdown_it")
pytest.importorskip("reportlab")


def _builder():
    spec = importlib.util.spec_from_file_location("tinylm_guide_build", GUIDE / "build.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


B = _builder()


def _write(d: Path, name: str, text: str) -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def _toy(d: Path, value: str = "6 * 7") -> Path:
    g = d / "guide"
    g.mkdir(exist_ok=True)
    _write(g, "01-first.md", f"""\
        # First

        ```python
        x = {value}
        print(f"the answer is {{quote('answer', x)}}")
        ```

        The code printed {{{{answer}}}}.
        """)
    _write(g, "02-second.md", """\
        <!-- needs: first -->
        # Second

        ```sh
        echo "made by sh" > note.txt && cat note.txt
        ```

        ```python
        from pathlib import Path
        print(Path("note.txt").read_text().strip(), "and", Path("../first").is_dir())
        ```
        """)
    return g


def _html(out: Path, name: str) -> str:
    return next((out / "html").glob(f"*-{name}.html")).read_text(encoding="utf-8")


def test_prose_quotes_what_the_block_printed(tmp_path):
    g = _toy(tmp_path)
    out = tmp_path / "out"
    B.build(out, quick=True, only="html", guide=g, log=lambda m: None)
    page = _html(out, "first")
    assert "The code printed 42." in page
    assert "the answer is 42" in page  # the block's output, under it
    # the code changes, the number in the prose follows it: nobody retypes it
    _toy(tmp_path, value="6 * 9")
    B.build(out, quick=True, only="html", guide=g, log=lambda m: None)
    page = _html(out, "first")
    assert "The code printed 54." in page and "42" not in page
    assert "made by sh and True" in _html(out, "second")


def test_a_quote_that_was_not_printed_fails_the_build(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    _write(g, "01-a.md", """\
        # A

        ```python
        quote("n", 3)
        print("something else")
        ```

        n is {{n}}.
        """)
    with pytest.raises(B.BuildError, match="not in what the block printed"):
        B.build(tmp_path / "out", quick=True, only="html", guide=g, log=lambda m: None)


def test_a_prose_number_nobody_quoted_fails_the_build(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    _write(g, "01-a.md", """\
        # A

        ```python
        print(1)
        ```

        The loss fell to {{loss}}.
        """)
    with pytest.raises(B.BuildError, match=r"quotes \{\{loss\}\}"):
        B.build(tmp_path / "out", quick=True, only="html", guide=g, log=lambda m: None)


def test_a_failing_block_fails_the_build_with_its_line(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    _write(g, "01-a.md", """\
        # A

        ```python
        ok = 1
        ```

        ```python
        raise RuntimeError("boom")
        ```
        """)
    with pytest.raises(B.BuildError, match=r"01-a.md:7: this python block failed:(.|\n)*boom"):
        B.build(tmp_path / "out", quick=True, only="html", guide=g, log=lambda m: None)
    _write(g, "01-a.md", """\
        # A

        ```sh
        false
        ```
        """)
    with pytest.raises(B.BuildError, match="exit status 1"):
        B.build(tmp_path / "out", quick=True, only="html", guide=g, log=lambda m: None)


def test_cache_reruns_only_the_changed_chapter_and_those_that_need_it(tmp_path):
    g = _toy(tmp_path)
    _write(g, "03-third.md", """\
        # Third

        ```python
        print("third")
        ```
        """)
    out = tmp_path / "out"
    quiet = dict(quick=True, only="html", guide=g, log=lambda m: None)
    assert B.build(out, **quiet)["ran"] == {"first": "ran", "second": "ran", "third": "ran"}
    assert B.build(out, **quiet)["ran"] == {"first": "cached", "second": "cached", "third": "cached"}
    p = g / "03-third.md"
    p.write_text(p.read_text() + "\nOne more sentence.\n")
    assert B.build(out, **quiet)["ran"] == {"first": "cached", "second": "cached", "third": "ran"}
    _toy(tmp_path, value="7 * 6")  # first changes: second needs it, third does not
    assert B.build(out, **quiet)["ran"] == {"first": "ran", "second": "ran", "third": "cached"}
    # the full build is cached apart from the quick one
    assert B.build(out, quick=False, only="html", guide=g, log=lambda m: None)["ran"]["third"] == "ran"


def test_pdf_has_contents_figures_and_page_numbers(tmp_path):
    pdfium = pytest.importorskip("pypdfium2")
    g = tmp_path / "g"
    g.mkdir()
    _write(g, "01-plots.md", """\
        # Plots → and ∂L/∂x

        Prose with `inline code`, **bold** and a list:

        - one
        - two

        ```python
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots()
        ax.plot([1, 2, 3])
        figure(fig, "A line")
        print("x" * 250)
        ```
        """)
    res = B.build(tmp_path / "out", quick=True, guide=g, log=lambda m: None, listing_files=("tinylm/tensor.py",))
    doc = pdfium.PdfDocument(str(res["pdf"]))
    text = "\n".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
    assert "Contents" in text and "1. Plots → and ∂L/∂x" in text
    assert "Figure 1.1: A line" in text
    assert "Appendix A: Full code listing" in text and "class Tensor" in text
    assert re.search(r"\n\s*3\s*\n", text)  # a page number
    assert "↪" in text  # the 250-character line was wrapped, not cut off


def test_a_character_without_a_glyph_fails_the_pdf(tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    _write(g, "01-a.md", """\
        # A

        A character DejaVu lacks: \U0001F9E0.
        """)
    with pytest.raises(B.BuildError, match="no glyph"):
        B.build(tmp_path / "out", quick=True, only="pdf", guide=g, log=lambda m: None, listing_files=())


@pytest.mark.slow
def test_quick_build_of_the_guide(tmp_path):
    """Every chapter of the real guide runs (tiny settings) and is in both outputs."""
    pdfium = pytest.importorskip("pypdfium2")
    res = B.build(tmp_path / "out", quick=True)
    chs = res["chapters"]
    assert len(chs) >= 10
    doc = pdfium.PdfDocument(str(res["pdf"]))
    text = "\n".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
    for ch in chs:
        assert f"{ch.number}. {ch.title}" in text, ch.title
        assert (tmp_path / "out" / "html" / f"{ch.number:02d}-{ch.name}.html").is_file()
        for label in B.figure_numbers(ch).values():
            assert f"{label}:" in text, label
