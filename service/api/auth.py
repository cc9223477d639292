"""Bearer tokens: kept as SHA-256 hashes and compared in constant time; who a token is (`Principal`).

The dependencies that check a request's token (`Reader`, `Writer`) are in `service.api.deps`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from service.settings import TokenEntry, hash_token


@dataclass(frozen=True)
class Principal:
    name: str
    read_only: bool
    token_sha256: str = ""  # which token: scopes idempotency keys
    admin: bool = False  # may cancel any job (others: only the jobs they submitted)

    @property
    def owner(self) -> str:
        """What a job it submits records as its owner: the name, and which token (names need not be unique)."""
        return f"{self.name[:80]}@{self.token_sha256[:16]}"


def match_token(token: str, entries: list[TokenEntry]) -> TokenEntry | None:
    """The entry whose hash equals the token's; every entry is compared (no early exit)."""
    digest = hash_token(token).encode()
    found = None
    for entry in entries:
        if hmac.compare_digest(digest, entry.sha256.encode()):
            found = entry
    return found
