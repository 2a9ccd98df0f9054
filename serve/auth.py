"""Optional API key for Serve and the dashboard (no web framework here: both servers call it).

Off unless a key is given (``BITLM_API_KEY`` in the environment of ``make serve`` /
``serve/run.py`` / ``run_dashboard``, or ``api_key=`` to ``build`` / ``make_server``). When on,
every request but the ``exempt`` paths (``/health`` by default; ``auth_exempt: []`` in
serve/config.yaml's args exempts nothing) needs ``Authorization: Bearer <key>``, else it gets
401 with ``WWW-Authenticate: Bearer``. A browser opens a page once as ``/?key=<key>`` (or
``/playground?key=``): the server answers with a same-site, HTTP-only cookie holding the key
and a redirect to the page without it, and the page's own requests then carry the cookie.

Only a SHA-256 digest of the key travels to Serve replicas (deployment arguments are visible
in Ray's dashboard); keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from http.cookies import SimpleCookie

ENV = "BITLM_API_KEY"
COOKIE = "bitlm_key"
DEFAULT_EXEMPT = ("/health",)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Access:
    """Who may use a server: anyone (no key), or holders of the key whose digest it keeps."""

    def __init__(self, key_digest: str | None = None, exempt: tuple[str, ...] | list[str] = DEFAULT_EXEMPT):
        self.key_digest, self.exempt = key_digest, tuple(exempt)

    @classmethod
    def from_key(cls, key: str | None = None, exempt=DEFAULT_EXEMPT) -> Access:
        """From ``key``, else ``BITLM_API_KEY``; an empty key is no key."""
        key = key if key is not None else os.environ.get(ENV, "")
        return cls(digest(key) if key else None, exempt)

    @property
    def enabled(self) -> bool:
        return self.key_digest is not None

    def allows(self, path: str, authorization: str | None, cookie_header: str | None) -> bool:
        if not self.enabled or path in self.exempt:
            return True
        presented = None
        if authorization and authorization[:7].lower() == "bearer ":
            presented = authorization[7:].strip()
        elif cookie_header:
            morsel = SimpleCookie(cookie_header).get(COOKIE)
            presented = morsel.value if morsel else None
        return presented is not None and hmac.compare_digest(digest(presented), self.key_digest)

    def login_cookie(self, key: str) -> str | None:
        """The Set-Cookie value for a page opened with ``?key=``, or None for a wrong key."""
        if not self.enabled or not hmac.compare_digest(digest(key), self.key_digest):
            return None
        return f"{COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict"


_INSTALLED = [Access()]


def install(access: Access) -> None:
    """Make ``access`` this process's (a Serve replica's Ingress calls it; the app's middleware
    reads it with :func:`installed`). A registry in this module, not a global of the app's:
    Serve ships the ingress class by value, with its own copy of that module's globals."""
    _INSTALLED[0] = access


def installed() -> Access:
    return _INSTALLED[0]


UNAUTHORIZED = {
    "error": {
        "message": "missing or wrong API key: send Authorization: Bearer <key> (the server's BITLM_API_KEY)",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
