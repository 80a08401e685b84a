"""The one form of a request path that proxyd routes on and forwards (RFC 3986 §6.2.2).

Spellings of a path that an origin server takes for the same resource must not match different
routes, or a client picks the spelling that skips a route's protection (``/public/%2e%2e/
private/x`` past a ``/private/`` route). So before routing a path is normalised: percent-escapes
of unreserved characters are decoded and the hex digits of the others are uppercased
(§6.2.2.1-2), then dot segments are removed (§5.2.4) — after the decoding, so ``%2e%2e`` is a
``..`` segment. The result is what the route sees and what the upstream receives.

An encoded ``/`` or ``\\`` (``%2F``, ``%5C``) and a raw ``\\`` have no single meaning: some
servers decode them into separators after proxyd has matched the path without them. They are
refused by default; ``server.encoded_slashes: keep`` routes them as ordinary characters of a
segment and forwards them encoded (a raw ``\\`` as ``%5C``), never as separators. An encoded NUL
and a malformed escape are always refused.

The query is not touched: its encoding is the application's.
"""

from __future__ import annotations

from typing import Final

# RFC 3986 §2.3: the characters whose escapes mean the same as the characters themselves.
UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
SLASH: Final = 0x2F
BACKSLASH: Final = 0x5C


class BadPath(Exception):
    """A request path that has no one meaning; answered 400 with ``message``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _escape_table(keep_slashes: bool) -> dict[bytes, bytes]:
    """Every two hex digits after a ``%`` → their normal form; absent: refused."""
    digits = b"0123456789abcdefABCDEF"
    table: dict[bytes, bytes] = {}
    for hi in digits:
        for lo in digits:
            octet = int(bytes((hi, lo)), 16)
            if octet == 0 or (octet in (SLASH, BACKSLASH) and not keep_slashes):
                continue
            table[bytes((hi, lo))] = (bytes((octet,)) if octet in UNRESERVED
                                      else b"%%%02X" % octet)
    return table


# Built at import, so normalising a path is one dict lookup per escape.
ESCAPES_KEEP: Final = _escape_table(True)
ESCAPES_REJECT: Final = _escape_table(False)


def needs_normalizing(path: bytes) -> bool:
    """Whether ``path`` has an escape, a backslash or a dot segment; most have none.

    One pass over the bytes instead of a find() per thing looked for: compiled, the loop
    costs less than the single find(b"/.") that guarded dot-segment removal before (each
    find() is a Python method call). Interpreted it costs more than the finds would, but the
    interpreted build is the fallback, not the one measured or deployed.
    """
    prev = 0
    for i in range(len(path)):
        c = path[i]
        if c == 0x25 or c == BACKSLASH or (c == 0x2E and prev == SLASH):  # %  \  /.
            return True
        prev = c
    return False


def normalize_path(path: bytes, keep_slashes: bool) -> bytes:
    """The normal form of a request path (without its query); BadPath when it has none.

    ``keep_slashes``: the ``keep`` policy for encoded slashes and backslashes (module
    docstring). Call it where needs_normalizing(path) says so; a path without escapes,
    backslashes or dot segments is its own normal form.
    """
    # find(), not "in": bytes.__contains__ first tries its argument as an int, and raises and
    # clears a TypeError; find() goes straight to the search.
    if path.find(b"%") >= 0:
        table = ESCAPES_KEEP if keep_slashes else ESCAPES_REJECT
        pieces = path.split(b"%")
        out = [pieces[0]]
        for i in range(1, len(pieces)):
            piece = pieces[i]
            normal = table.get(piece[:2])
            if normal is None:
                raise BadPath(_refusal(piece[:2]))
            out.append(normal)
            out.append(piece[2:])
        # Decoding yields only unreserved characters: never a new "%", "/" or "\".
        path = b"".join(out)
    if path.find(b"\\") >= 0:
        if not keep_slashes:
            raise BadPath("backslash in the request path")
        path = path.replace(b"\\", b"%5C")
    if path.find(b"/.") >= 0:
        path = remove_dot_segments(path)
    return path


def _refusal(digits: bytes) -> str:
    if digits.upper() in (b"2F", b"5C"):
        return "encoded slash or backslash in the request path"
    if digits == b"00":
        return "encoded NUL in the request path"
    return "malformed percent-encoding in the request path"


def remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path, so /api/../admin cannot slip past /api/."""
    segments = path.split(b"/")
    last = len(segments) - 1
    out: list[bytes] = []
    for i in range(1, last + 1):  # segments[0] is the empty one before the leading "/"
        seg = segments[i]
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if out:
                out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)
