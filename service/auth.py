"""Bearer-token auth: tokens are kept as SHA-256 hashes and compared in constant time.

Every route but `/healthz` depends on `require_reader` or `require_writer`; a read-only token gets
403 on routes that change state (submit, cancel).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.settings import TokenEntry, hash_token

bearer = HTTPBearer(auto_error=False, description="vqtrain API token")


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


def require_reader(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    entry = match_token(creds.credentials, request.app.state.settings.tokens)
    if entry is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(entry.name, entry.read_only, entry.sha256, entry.admin)


def require_writer(principal: Annotated[Principal, Depends(require_reader)]) -> Principal:
    if principal.read_only:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {principal.name!r} is read-only")
    return principal


Reader = Annotated[Principal, Depends(require_reader)]
Writer = Annotated[Principal, Depends(require_writer)]
