"""The guide as one PDF, with ReportLab (pip only: no LaTeX, no system libraries).

Markdown is walked as markdown-it tokens and turned into ReportLab flowables: headings (each
chapter on a new page, entered in the table of contents), paragraphs with inline code, bold,
italics and links, lists, tables, code blocks highlighted with Pygments' tokens, their output,
and numbered figures. Fonts are the DejaVu faces matplotlib ships (wide Unicode coverage:
arrows, Greek, ≤, ∂, Σ). Two checks make a bad page a build error rather than something to spot:
- every character must have a glyph in its font (a missing one would print as a blank box);
- code and output lines are wrapped at ``CODE_COLS`` columns (a continuation line starts with
  ``↪``), and the width of every line is checked against the frame, so nothing overflows.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import (Image, KeepTogether, ListFlowable, ListItem, PageBreak, Paragraph, Spacer, Table,
                                TableStyle, XPreformatted)
from reportlab.platypus.doctemplate import BaseDocTemplate, PageTemplate
from reportlab.platypus.frames import Frame
from reportlab.platypus.tableofcontents import TableOfContents

PAGE_W, PAGE_H = A4
MARGIN = 20 * mm
FRAME_W = PAGE_W - 2 * MARGIN
CODE_SIZE = 7.6
CODE_COLS = 100
FONTS = {"Sans": "DejaVuSans.ttf", "Sans-Bold": "DejaVuSans-Bold.ttf", "Sans-Italic": "DejaVuSans-Oblique.ttf",
         "Sans-BoldItalic": "DejaVuSans-BoldOblique.ttf", "Mono": "DejaVuSansMono.ttf",
         "Mono-Bold": "DejaVuSansMono-Bold.ttf"}
PYG_COLORS = {"Keyword": "#0b4bb3", "Name.Builtin": "#7a3e9d", "Name.Function": "#1a7f37", "Name.Class": "#1a7f37",
              "Literal.String": "#a3501b", "Literal.Number": "#0a7a7a", "Comment": "#6a737d", "Operator.Word": "#0b4bb3",
              "Name.Decorator": "#7a3e9d"}


class PdfError(Exception):
    pass


def _register_fonts() -> None:
    import matplotlib  # noqa: PLC0415

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for name, file in FONTS.items():
        if name not in pdfmetrics.getRegisteredFontNames():
            pdfmetrics.registerFont(TTFont(name, str(ttf / file)))
    from reportlab.lib.fonts import addMapping  # noqa: PLC0415

    addMapping("Sans", 0, 0, "Sans")
    addMapping("Sans", 1, 0, "Sans-Bold")
    addMapping("Sans", 0, 1, "Sans-Italic")
    addMapping("Sans", 1, 1, "Sans-BoldItalic")
    addMapping("Mono", 0, 0, "Mono")
    addMapping("Mono", 1, 0, "Mono-Bold")
    addMapping("Mono", 0, 1, "Mono")
    addMapping("Mono", 1, 1, "Mono-Bold")


def _styles() -> dict:
    base = dict(fontName="Sans", fontSize=10, leading=14.2)
    return {
        "body": ParagraphStyle("body", **base, spaceAfter=6),
        "h1": ParagraphStyle("h1", fontName="Sans-Bold", fontSize=20, leading=25, spaceBefore=6, spaceAfter=14),
        "h2": ParagraphStyle("h2", fontName="Sans-Bold", fontSize=13.5, leading=18, spaceBefore=10, spaceAfter=6),
        "h3": ParagraphStyle("h3", fontName="Sans-Bold", fontSize=11.2, leading=15, spaceBefore=8, spaceAfter=4),
        "code": ParagraphStyle("code", fontName="Mono", fontSize=CODE_SIZE, leading=CODE_SIZE * 1.28),
        "caption": ParagraphStyle("caption", fontName="Sans-Italic", fontSize=9, leading=12, alignment=TA_CENTER,
                                  spaceAfter=10),
        "cell": ParagraphStyle("cell", fontName="Sans", fontSize=8.6, leading=11),
        "title": ParagraphStyle("title", fontName="Sans-Bold", fontSize=28, leading=34, alignment=TA_CENTER),
        "subtitle": ParagraphStyle("subtitle", fontName="Sans", fontSize=13, leading=18, alignment=TA_CENTER),
        "toc0": ParagraphStyle("toc0", fontName="Sans-Bold", fontSize=10.5, leading=15, leftIndent=0),
        "toc1": ParagraphStyle("toc1", fontName="Sans", fontSize=9.2, leading=12.5, leftIndent=14),
    }


class _GlyphCheck:
    """Every character drawn must be in its font; collects the ones that are not."""

    def __init__(self):
        self.missing: dict[str, set] = {}
        self._cmaps = {}

    def check(self, text: str, font: str, where: str) -> None:
        if font not in self._cmaps:
            self._cmaps[font] = set(pdfmetrics.getFont(font).face.charToGlyph)
        cmap = self._cmaps[font]
        for ch in set(text):
            if ch not in "\n\t" and ord(ch) not in cmap:
                self.missing.setdefault(f"U+{ord(ch):04X} {ch!r} in {font}", set()).add(where)


def _inline(tokens, glyphs: _GlyphCheck, where: str) -> str:
    """markdown-it inline children -> ReportLab paragraph markup."""
    out = []
    for t in tokens:
        if t.type == "text":
            glyphs.check(t.content, "Sans", where)
            out.append(html.escape(t.content, quote=False))
        elif t.type == "code_inline":
            glyphs.check(t.content, "Mono", where)
            out.append(f'<font face="Mono" size="8.8" color="#8a1f11">{html.escape(t.content, quote=False)}</font>')
        elif t.type in ("softbreak",):
            out.append(" ")
        elif t.type == "hardbreak":
            out.append("<br/>")
        elif t.type == "strong_open":
            out.append("<b>")
        elif t.type == "strong_close":
            out.append("</b>")
        elif t.type == "em_open":
            out.append("<i>")
        elif t.type == "em_close":
            out.append("</i>")
        elif t.type == "link_open":
            href = t.attrs.get("href", "")
            out.append(f'<a href="{html.escape(href)}" color="#0b4bb3">' if href.startswith("http") else "<u>")
        elif t.type == "link_close":
            out.append("</a>" if out and any(s.startswith("<a ") for s in out) and "<u>" not in out[-3:] else "</u>")
        elif t.type == "html_inline":
            pass
        else:
            glyphs.check(t.content, "Sans", where)
            out.append(html.escape(t.content, quote=False))
    text = "".join(out)
    # a link opened as <u> closes as </u>; make the pairs consistent
    return _balance_links(text)


def _balance_links(text: str) -> str:
    opened = []
    res = []
    for piece in re.split(r"(<a [^>]*>|<u>|</a>|</u>)", text):
        if piece.startswith("<a "):
            opened.append("</a>")
            res.append(piece)
        elif piece == "<u>":
            opened.append("</u>")
            res.append(piece)
        elif piece in ("</a>", "</u>"):
            res.append(opened.pop() if opened else "")
        else:
            res.append(piece)
    return "".join(res)


def wrap_code(text: str, cols: int = CODE_COLS) -> list[str]:
    """Lines of at most ``cols`` characters; a cut line continues on the next with '↪ '."""
    lines = []
    for line in text.expandtabs(4).split("\n"):
        while len(line) > cols:
            lines.append(line[:cols])
            line = "↪ " + line[cols:]
        lines.append(line)
    return lines


def _highlighted(code_lines: list[str], lang: str) -> str:
    from pygments.lexers import TextLexer, get_lexer_by_name  # noqa: PLC0415
    
    try:
        lexer = get_lexer_by_name({"sh": "bash"}.get(lang, lang))
    except Exception:  # noqa: BLE001
        lexer = TextLexer()
    out = []
    for tok, val in lexer.get_tokens("\n".join(code_lines)):
        color = None
        t = tok
        while t is not None and color is None:
            color = PYG_COLORS.get(str(t).removeprefix("Token."))
            t = t.parent if t.parent is not t else None
        # each line's markup is closed on that line, so a block can be cut between any two lines
        pieces = []
        for piece in val.split("\n"):
            esc = html.escape(piece, quote=False)
            pieces.append(f'<font color="{color}">{esc}</font>' if color and piece.strip() else esc)
        out.append("\n".join(pieces))
    return "".join(out).rstrip("\n")


def _code_box(text: str, lang: str, st: dict, glyphs: _GlyphCheck, where: str, output: bool = False):
    lines = wrap_code(text.rstrip("\n"))
    glyphs.check("\n".join(lines), "Mono", where)
    inner_w = FRAME_W - 12
    for ln in lines:
        if pdfmetrics.stringWidth(ln, "Mono", CODE_SIZE) > inner_w:
            raise PdfError(f"{where}: a code line is wider than the page: {ln[:60]!r}")
    markup = html.escape("\n".join(lines), quote=False) if output or lang not in ("python", "sh", "toml", "json") \
        else _highlighted(lines, lang)
    boxes = []
    # long blocks are split so a page break can fall between the pieces
    chunk = 60
    raw = markup.split("\n")
    for i in range(0, max(len(raw), 1), chunk):
        pre = XPreformatted("\n".join(raw[i:i + chunk]), st["code"])
        t = Table([[pre]], colWidths=[FRAME_W])
        t.setStyle(TableStyle([
            ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fffdf3" if output else "#f5f5f7")),
            ("BOX", (0, 0), (-1, -1), 0.5, colors.HexColor("#e0d59a" if output else "#d8d8de")),
            ("LEFTPADDING", (0, 0), (-1, -1), 6), ("RIGHTPADDING", (0, 0), (-1, -1), 6),
            ("TOPPADDING", (0, 0), (-1, -1), 4), ("BOTTOMPADDING", (0, 0), (-1, -1), 4)]))
        boxes.append(t)
    return boxes


def _md_flowables(text: str, st: dict, glyphs: _GlyphCheck, where: str, md) -> list:
    tokens = md.parse(text)
    flow, i = [], 0
    list_stack: list[list] = []
    while i < len(tokens):
        t = tokens[i]
        if t.type == "heading_open":
            level = int(t.tag[1])
            inline = tokens[i + 1]
            p = Paragraph(_inline(inline.children, glyphs, where), st["h2" if level <= 2 else "h3"])
            p._toc = (1, inline.content) if level <= 2 else None
            flow.append(p)
            i += 3
            continue
        if t.type == "paragraph_open":
            inline = tokens[i + 1]
            p = Paragraph(_inline(inline.children, glyphs, where), st["body"])
            if list_stack and list_stack[-1]:
                list_stack[-1][-1].append(p)  # inside the current list item
            else:
                flow.append(p)
            i += 3
            continue
        if t.type in ("bullet_list_open", "ordered_list_open"):
            list_stack.append([])
            i += 1
            continue
        if t.type == "list_item_open":
            list_stack[-1].append([])
            i += 1
            continue
        if t.type == "list_item_close":
            i += 1
            continue
        if t.type in ("bullet_list_close", "ordered_list_close"):
            items = list_stack.pop()
            lf = ListFlowable([ListItem(x, leftIndent=14) for x in items if x],
                              bulletType="bullet" if t.type == "bullet_list_close" else "1",
                              start="•" if t.type == "bullet_list_close" else None, bulletFontName="Sans",
                              bulletFontSize=9, leftIndent=14)
            if list_stack and list_stack[-1]:
                list_stack[-1][-1].append(lf)
            else:
                flow.append(lf)
            i += 1
            continue
        if t.type == "fence" or t.type == "code_block":
            flow.extend(_code_box(t.content, t.info.strip() or "text", st, glyphs, where))
            flow.append(Spacer(1, 5))
            i += 1
            continue
        if t.type == "table_open":
            rows, j = [], i + 1
            while tokens[j].type != "table_close":
                if tokens[j].type == "tr_open":
                    rows.append([])
                if tokens[j].type == "inline":
                    rows[-1].append(Paragraph(_inline(tokens[j].children, glyphs, where), st["cell"]))
                j += 1
            ncol = max(len(r) for r in rows)
            tab = Table(rows, colWidths=[FRAME_W / ncol] * ncol, repeatRows=1)
            tab.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.4, colors.HexColor("#bbbbbb")),
                                     ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeF2")),
                                     ("VALIGN", (0, 0), (-1, -1), "TOP")]))
            flow.extend([tab, Spacer(1, 8)])
            i = j + 1
            continue
        if t.type == "hr":
            flow.append(Spacer(1, 8))
        i += 1
    return flow


class _Doc(BaseDocTemplate):
    def __init__(self, path, **kw):
        super().__init__(str(path), pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=MARGIN,
                         bottomMargin=MARGIN, **kw)
        frame = Frame(MARGIN, MARGIN, FRAME_W, PAGE_H - 2 * MARGIN, id="f")
        self.addPageTemplates([PageTemplate("p", [frame], onPage=self._footer)])

    def _footer(self, canvas, doc):
        if doc.page > 1:
            canvas.setFont("Sans", 8.5)
            canvas.setFillColor(colors.HexColor("#666666"))
            canvas.drawCentredString(PAGE_W / 2, 10 * mm, str(doc.page))
            canvas.drawString(MARGIN, PAGE_H - 12 * mm, "Build a Large Language Model from Scratch — tinylm")

    def afterFlowable(self, flowable):
        toc = getattr(flowable, "_toc", None)
        if toc:
            level, text = toc
            key = f"h{id(flowable)}"
            self.canv.bookmarkPage(key)
            self.canv.addOutlineEntry(text, key, level=level, closed=level > 0)
            self.notify("TOCEntry", (level, html.escape(text), self.page, key))


def write_pdf(chs, out: Path, listing, rendered_parts, figure_numbers, md) -> Path:
    """Writes OUT/guide.pdf (atomically); raises PdfError for a missing glyph or a line too wide.
    ``rendered_parts`` and ``figure_numbers`` are build.py's; ``md`` its Markdown parser."""
    _register_fonts()
    st = _styles()
    glyphs = _GlyphCheck()
    story = [Spacer(1, 70 * mm), Paragraph("Build a Large Language Model from Scratch", st["title"]),
             Spacer(1, 8 * mm), Paragraph("with tinylm: every output and figure produced by running the code shown",
                                          st["subtitle"]), PageBreak()]
    toc = TableOfContents()
    toc.levelStyles = [st["toc0"], st["toc1"]]
    story += [Paragraph("Contents", st["h1"]), toc, PageBreak()]
    for ch in chs:
        nums = figure_numbers(ch)
        where = ch.path.name
        head = Paragraph(f"{ch.number}. {html.escape(ch.title)}", st["h1"])
        head._toc = (0, f"{ch.number}. {ch.title}")
        story.append(head)
        for kind, *rest in rendered_parts(ch):
            if kind == "md":
                story.extend(_md_flowables(rest[0], st, glyphs, where, md))
                continue
            block, stdout, figs = rest
            story.extend(_code_box(block.code, block.lang, st, glyphs, f"{where}:{block.line}"))
            if stdout and stdout.strip():
                story.append(Spacer(1, 2))
                story.extend(_code_box(stdout, "text", st, glyphs, f"{where}:{block.line} (output)", output=True))
            story.append(Spacer(1, 6))
            for f in figs:
                src = out / "cache" / ch.name / ch.key / f["file"]
                img = Image(str(src))
                scale = min(FRAME_W * 0.85 / img.imageWidth, 85 * mm / img.imageHeight)
                img.drawWidth, img.drawHeight = img.imageWidth * scale, img.imageHeight * scale
                glyphs.check(f["caption"], "Sans-Italic", where)
                story.append(KeepTogether([img, Paragraph(f"{nums[f['file']]}: {html.escape(f['caption'])}",
                                                          st["caption"])]))
        story.append(PageBreak())
    head = Paragraph("Appendix A: Full code listing", st["h1"])
    head._toc = (0, "Appendix A: Full code listing")
    story += [head, Paragraph("The core files of tinylm, read from the source tree when this PDF was built.",
                              st["body"])]
    for rel, text in listing:
        h = Paragraph(html.escape(rel), st["h2"])
        h._toc = (1, rel)
        story.append(h)
        story.extend(_code_box(text, "python", st, glyphs, rel))
    if glyphs.missing:
        lines = [f"{k} (in {', '.join(sorted(v)[:3])})" for k, v in sorted(glyphs.missing.items())]
        raise PdfError("characters with no glyph in the PDF's fonts:\n  " + "\n  ".join(lines))
    path = out / "guide.pdf"
    tmp = out / "guide.pdf.tmp"
    doc = _Doc(tmp, title="Build a Large Language Model from Scratch", author="tinylm")
    doc.multiBuild(story)
    tmp.replace(path)
    return path
