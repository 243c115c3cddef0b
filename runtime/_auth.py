"""Who is calling: one check per request, in the core, for every transport (docs/security.md).

A transport hands the core the request's metadata as it came (HTTP headers, TCP metadata entries, NATS
``Meta-<name>`` headers); ``credentials_from`` takes the credential out of it (``Authorization:
Bearer TOKEN``, else an ``X-Api-Key`` header), so that it never reaches the handler's ``ctx.metadata``,
a log line or a metric. The worker's ``Authenticator`` turns it into a ``Principal`` (subject, tenant,
scopes), which is all a handler sees (``ctx.principal``). Failures are UNAUTHENTICATED (no credential,
or one that is not valid: the same answer whether a token exists or not) and PERMISSION_DENIED (valid,
but without a scope the endpoint requires); neither is retryable.

``TokenFile`` is the built-in authenticator: one credential a line, ``TOKEN TENANT [SCOPE,...]
[weight=N]``, re-read on ``reload()`` (SIGUSR1 under ``ingress serve``). A user's own check (JWT
verification, say) is any object with ``authenticate(credentials) -> Principal``; it runs on the event
loop, so it must not block.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ._errors import PermissionDenied, Unauthenticated

# The metadata keys that carry a credential (compared without case): both are taken out of the metadata
# before the handler, the logs or anything else sees it.
AUTHORIZATION = "authorization"
API_KEY = "x-api-key"
# The one answer to a credential that is missing or not valid: it never says whether a token exists.
MISSING = "this worker requires a credential: send Authorization: Bearer TOKEN (or X-Api-Key: TOKEN)"
INVALID = "the credential is not valid"
MAX_WEIGHT = 1000.0
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: what a bearer token may hold


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request runs for: ``subject`` (the caller), ``tenant`` (whose share of the fleet it uses,
    docs/security.md "Fair admission"), the ``scopes`` it was granted, and the tenant's fair-share
    ``weight``."""

    subject: str
    tenant: str
    scopes: frozenset[str] = frozenset()
    weight: float = 1.0

    def __post_init__(self) -> None:
        # The fair queue divides by it, and a weight of 0, below it or NaN would starve everyone else.
        if not 0 < self.weight <= MAX_WEIGHT:
            raise ValueError(
                f"a principal's weight must be above 0 and at most {MAX_WEIGHT:g}, got {self.weight!r}"
            )


ANONYMOUS = Principal("anonymous", "anonymous")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the caller presented: a bearer token or an API key (None if it sent none)."""

    token: str | None = field(default=None, repr=False)  # never in a repr, so never in a traceback

    @property
    def present(self) -> bool:
        return self.token is not None


class Authenticator(Protocol):
    def authenticate(self, credentials: Credentials) -> Principal:
        """The principal for ``credentials``; raises ``Unauthenticated`` if there is none."""
        ...


def credentials_from(metadata: Mapping[str, str]) -> tuple[Credentials, dict[str, str]]:
    """The credential in ``metadata`` (``Authorization: Bearer``, else ``X-Api-Key``) and the metadata
    without any credential key."""
    token: str | None = None
    rest: dict[str, str] = {}
    api_key: str | None = None
    for key, value in metadata.items():
        lowered = key.lower()
        if lowered == AUTHORIZATION:
            scheme, _, rest_of_value = value.strip().partition(" ")
            token = rest_of_value.strip() if scheme.lower() == "bearer" else ""
        elif lowered == API_KEY:
            api_key = value.strip()
        else:
            rest[key] = value
    if token is None:
        token = api_key
    return Credentials(token), rest


def authorize(principal: Principal, endpoint: str, required: frozenset[str]) -> None:
    """PERMISSION_DENIED unless ``principal`` holds every scope in ``required``."""
    missing = sorted(required - principal.scopes)
    if missing:
        raise PermissionDenied(f"endpoint {endpoint!r} requires the scope(s) {', '.join(missing)}")


class TokenFile:
    """Bearer tokens from a file, one a line: ``TOKEN TENANT [SCOPE,...] [weight=N]`` (``#`` starts a
        comment). Tokens are kept only as SHA-256 digests (looked up by digest: no timing of the token's own
    bytes). ``reload()``
        re-reads the file; a file that fails to parse keeps the tokens in force and raises ``ValueError``
        with the line number (never the token). ``fallback`` decides credentials the file does not know
        (a JWT check, say); without it they are UNAUTHENTICATED."""

    def __init__(self, path: str, *, fallback: Authenticator | None = None) -> None:
        self.path = path
        self.fallback = fallback
        self._principals: dict[bytes, Principal] = {}
        self.reload()

    def reload(self) -> int:
        """Read the file again; returns how many tokens are now in force."""
        try:
            with open(self.path, encoding="utf-8") as file:
                lines = file.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the token file {self.path}: {exc}") from None
        self._principals = parse_tokens(lines, self.path)
        return len(self._principals)

    def authenticate(self, credentials: Credentials) -> Principal:
        if not credentials.present:
            raise Unauthenticated(MISSING)
        assert credentials.token is not None
        principal = self._principals.get(_digest(credentials.token))
        if principal is not None:
            return principal
        if self.fallback is not None:
            return self.fallback.authenticate(credentials)
        raise Unauthenticated(INVALID)


def parse_tokens(lines: list[str], source: str) -> dict[bytes, Principal]:
    """The token file's lines as {sha256(token): principal}; ``ValueError`` names the bad line."""
    principals: dict[bytes, Principal] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{source}, line {number}"
        if len(fields) < 2 or not _TOKEN.fullmatch(fields[0]):
            raise ValueError(f"{where}: expected TOKEN TENANT [SCOPE,...] [weight=N]")
        token, tenant, *rest = fields
        weight, scopes = 1.0, frozenset[str]()
        for extra in rest:
            if extra.startswith("weight="):
                weight = _weight(extra[len("weight=") :], where)
            else:
                scopes = frozenset(s for s in extra.split(",") if s)
        digest = _digest(token)
        if digest in principals:
            raise ValueError(f"{where}: the same token is listed twice")
        # The subject names the line, not the token: logs may say who called without saying how.
        principals[digest] = Principal(f"{tenant}#{number}", tenant, scopes, weight)
    return principals


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = 0.0
    if not 0 < weight <= MAX_WEIGHT:
        raise ValueError(f"{where}: weight must be a number above 0 and at most 1000, got {text!r}")
    return weight


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
