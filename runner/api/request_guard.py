"""Requests that pages of other sites must not make through a user's browser.

The API listens on loopback, but every page open in the user's browser can reach loopback too:
a form or a `text/plain` fetch needs no CORS preflight, and the API reads JSON whatever the
Content-Type says, so without a check any site could send tasks, install plugins or delete apps.
Two rules, as local development servers apply them:

- A request that changes something (POST, PUT, PATCH, DELETE) from a browser page of another
  origin is refused: browsers send `Origin` (and `Sec-Fetch-Site`) with every such request; curl,
  scripts and Celery clients send neither and are not affected.
- While the API listens on loopback, the Host must be a loopback name. Otherwise a site whose name
  resolves to 127.0.0.1 (DNS rebinding) would be "same origin" and could read and change
  everything.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from flask import Flask, request

from runner.api.errors import error_response
from runner.settings import Settings
from runner.settings.kinds import is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = ("localhost",)


def _host_name(host: str) -> str:
    """'127.0.0.1:5001' → '127.0.0.1', '[::1]:5001' → '::1', 'LocalHost' → 'localhost'."""
    return (urlsplit(f"//{host}").hostname or "").lower()


def _loopback_host(host: str) -> bool:
    name = _host_name(host)
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):  # RFC 6761: *.localhost is loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def cross_origin(origin: str | None, fetch_site: str | None, host: str) -> bool:
    if fetch_site in ("cross-site", "same-site"):
        return True
    if origin is None:
        return False
    if origin == "null":  # a sandboxed frame, a file:// page
        return True
    parts = urlsplit(origin)
    return parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower()


def install_request_guard(app: Flask, settings: Settings) -> None:
    check_host = is_loopback(settings.DIFY_BIND_ADDRESS)

    @app.before_request
    def _guard():
        if check_host and not _loopback_host(request.host):
            return error_response(
                403, f"Host {request.host!r} refused: this API listens on loopback and answers only to "
                     "localhost, 127.0.0.1 or [::1] (a page of another name resolving here is refused)")
        if request.method not in SAFE_METHODS and cross_origin(
                request.headers.get("Origin"), request.headers.get("Sec-Fetch-Site"), request.host):
            origin = request.headers.get("Origin") or request.headers.get("Sec-Fetch-Site")
            return error_response(
                403, f"cross-origin {request.method} refused: a page of {origin} may not change this API "
                     f"(http://{request.host}); send it from the dashboard, curl or a script")
        return None
