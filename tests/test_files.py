"""tinylm._files: the JSON reader every file format uses, and the file hash."""
import hashlib

import pytest

from tinylm._files import read_json, sha256_file


def test_read_json_names_file_line_and_column(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"a": 1,\n "b": }', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.json: corrupted \(line 2, column 7: Expecting value\)"):
        read_json(p, "corrupted")
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON \(not UTF-8 text: .* at byte 7\)"):
        read_json(p)
    p.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(p) == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # > 1 MiB: several blocks
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
