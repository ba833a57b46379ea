"""JSON Lines read line by line, so a bad line is reported by file and line number."""

import json
from typing import IO, Iterator

from moba_train.errors import UserError


def not_utf8(path: str, lineno: int, error: type[UserError] = UserError) -> UserError:
    return error(f"{path}:{lineno}: not UTF-8 text; convert the file (e.g. iconv -f latin1 -t utf-8)")


def json_lines(f: IO[bytes], path: str, error: type[UserError] = UserError) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) per non-blank line of a binary file; `error` names path:line for a line that
    is not UTF-8 or not JSON. Lines end in LF, CRLF or a lone CR (old Mac files; JSON escapes CR in strings, so a
    raw CR only ever ends a line)."""
    lineno = 0
    for raw in f:
        for piece in raw.rstrip(b"\n").removesuffix(b"\r").split(b"\r"):
            lineno += 1
            try:
                line = piece.decode("utf-8")
            except UnicodeDecodeError:
                raise not_utf8(path, lineno, error) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield lineno, obj
