"""What bounds an answer or a waiting call, whoever asks: the pages of the list RPCs and the slots
of calls that wait.

Pages follow Google's AIP-158: `page_size` (0: DEFAULT_PAGE_SIZE; larger than MAX_PAGE_SIZE:
MAX_PAGE_SIZE), an opaque `page_token`, a `next_page_token` that is empty on the last page, and
a stable order. A token holds the sort key of the last entry listed (a keyset cursor, not an
offset), so entries added or removed between pages never make a later page repeat or skip one
that stays; a token is only good for the list that issued it.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from typing import Any

from gradserve_engine.errors import InvalidRequest

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_CHARS = 1024  # a token this server issues is well under it; a longer one is refused before decoding

Key = tuple[Any, ...]  # the sort key of a list's entries, e.g. (created, job_id)


def page_size(requested: int) -> int:
    """The entries a page holds for a request's `page_size`."""
    if requested < 0:
        raise InvalidRequest(f"page_size must not be negative, got {requested}")
    return min(requested, MAX_PAGE_SIZE) if requested else DEFAULT_PAGE_SIZE


def next_token(kind: str, key: Key) -> str:
    """The page token that continues `kind`'s list after the entry with sort key `key`."""
    return base64.urlsafe_b64encode(json.dumps([kind, *key]).encode()).decode()


def after(kind: str, token: str, types: tuple[type, ...]) -> Key | None:
    """The sort key a page token of `kind`'s list continues after (None: an empty token, the
    first page). Anything this server did not issue for that list is INVALID_ARGUMENT."""
    if not token:
        return None
    refused = InvalidRequest(f"page_token is not one this server's {kind} list issued; list again without a page_token")
    if len(token) > MAX_TOKEN_CHARS:
        raise refused
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise refused from None
    if (not isinstance(decoded, list) or len(decoded) != len(types) + 1 or decoded[0] != kind
            or not all(type(v) is t for v, t in zip(decoded[1:], types, strict=True))):
        raise refused
    return tuple(decoded[1:])


class Slots:
    """A count of calls holding something scarce (a thread while they wait, a watch stream),
    at most `limit` at once: `take` says whether one more may, `give` ends one."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self._held

    def take(self) -> bool:
        with self._lock:
            if self._held >= self.limit:
                return False
            self._held += 1
            return True

    def give(self) -> None:
        with self._lock:
            self._held -= 1
