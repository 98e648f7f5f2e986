"""``tinylm tokenizer train|encode|decode``: train a BPE tokenizer on files, inspect encodings.

``train`` streams each ``--data`` file in ~1 MB pieces cut at line ends (one document per file,
so memory stays bounded by the table of distinct pre-tokens); a directory means the files
under it (sorted, hidden names skipped); files must be UTF-8, and the error names the file and
byte offset when one is not. No text at all is an error; text too short for ``--vocab-size``
gives a smaller tokenizer, and the closing line says so. ``encode`` prints ids (``--text`` or
stdin); ``decode`` prints text. Importing this module imports nothing heavy.
"""
from __future__ import annotations

import codecs
import sys

PIECE_BYTES = 1 << 20


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer, encode, decode")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="learn merges from text files")
    t.add_argument("--data", nargs="+", required=True, metavar="PATH", help="UTF-8 text files or directories of them")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + specials")
    t.add_argument("--out", required=True, metavar="FILE", help="tokenizer JSON to write")
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens (default: <|endoftext|>; give --special alone for none)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = sub.add_parser("encode", help="print the ids of a text")
    e.add_argument("--tokenizer", required=True, metavar="FILE")
    e.add_argument("--text", help="text to encode (default: read stdin)")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="print the text of ids")
    d.add_argument("--tokenizer", required=True, metavar="FILE")
    d.add_argument("ids", nargs="+", help="token ids (integers)")
    d.set_defaults(func=_decode)


def read_pieces(path: str, piece_bytes: int = PIECE_BYTES):
    """Yield a UTF-8 file as str pieces of ~piece_bytes, each ending at a line end (so a
    special token, which has no newline, is never cut in two); a file without line ends is
    cut after its last whitespace, and text with neither for 16 pieces is cut anywhere, so
    memory stays bounded."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    carry = ""
    with open(path, "rb") as f:
        while True:
            raw = f.read(piece_bytes)
            pending = len(dec.getstate()[0])  # bytes of a character cut by the last read
            try:
                text = dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 at byte {offset - pending + e.start}") from None
            offset += len(raw)
            text = carry + text
            if not raw:
                if text:
                    yield text
                return
            cut = text.rfind("\n") + 1
            if cut == 0:
                cut = max(text.rfind(" "), text.rfind("\t")) + 1
            if cut == 0:
                if len(text) < 16 * piece_bytes:
                    carry = text  # no place to cut yet: keep reading
                    continue
                cut = len(text)
            carry = text[cut:]
            yield text[:cut]


def _train(args) -> int:
    import os

    from tinylm.tokenizer import BPETokenizer
    from tinylm.tokenizer.train import WordCounter

    files = []
    for path in args.data:
        if os.path.isdir(path):
            from tinylm.data.sources import SourceOptions, list_files

            found = list_files([path], SourceOptions())
            if not found:
                raise ValueError(f"--data {path}: the directory contains no files")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--data {path}: no such file")
    specials = list(dict.fromkeys(args.special))
    if args.vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size must be at least {256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    tok = BPETokenizer()
    wc = WordCounter(tok.pattern, specials)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(os.path.getsize(p) for p in files), unit="B", unit_scale=True, desc="counting", leave=False)

    def pieces(path):
        for piece in read_pieces(path):
            yield piece
            if bar is not None:
                bar.update(len(piece.encode("utf-8", "surrogatepass")))

    for path in files:
        wc.add_stream(pieces(path))
    if bar is not None:
        bar.close()
    wc._flush()  # counts what is still batched, so bytes_seen is the total
    if wc.bytes_seen == 0:
        raise ValueError(f"--data {' '.join(args.data)}: no text to train on (the files are empty); "
                         f"no tokenizer written")
    tok._train_from_counter(wc, args.vocab_size, specials, not args.no_progress)
    tok.save(args.out)
    short = (f"; fewer than the {args.vocab_size} asked for: the text ran out of pairs to merge"
             if tok.vocab_size < args.vocab_size else "")
    print(f"wrote {args.out}: {tok.vocab_size} tokens ({len(tok.merges)} merges, {len(specials)} special), "
          f"{wc.bytes_seen:,} bytes of text{short}", file=sys.stderr)
    return 0


def _encode(args) -> int:
    from tinylm.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    print(" ".join(map(str, tok.encode(text))))
    return 0


def _decode(args) -> int:
    from tinylm.tokenizer import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    try:
        ids = [int(x) for x in args.ids]
    except ValueError:
        raise ValueError(f"ids must be integers, got {next(x for x in args.ids if not x.lstrip('-').isdigit())!r}") from None
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")
    return 0
