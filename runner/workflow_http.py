"""The workflow engine's HTTP request node: only to hosts the settings allow, no redirects followed.

A graph comes from whoever can reach the API, so an HTTP node is a way to make the worker send
requests: DIFY_LOCAL_WORKFLOW_HTTP_ALLOWED_HOSTS names the hosts (`name` or `name:port`) it may
reach; empty (the default) allows none. A redirect is returned as the response rather than
followed, since following it could leave the allowed hosts.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from typing import Any, Iterable
from urllib.parse import urlsplit

from runner.strict_json import loads_or_none

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
MAX_TIMEOUT = 30.0  # seconds
MAX_RESPONSE = 1024 * 1024  # bytes kept of a response body


class HttpNodeError(ValueError):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises HTTPError with the 3xx, which is returned as the response


_opener = urllib.request.build_opener(_NoRedirects)


def allowed_hosts(setting: str | Iterable[str]) -> frozenset[str]:
    """The allowed hosts from the setting's comma-separated text (or an iterable of names)."""
    items = setting.split(",") if isinstance(setting, str) else setting
    return frozenset(item.strip().lower() for item in items if item.strip())


def check_url(url: str, allowed: frozenset[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpNodeError(f"url {url!r} must be an http:// or https:// URL with a host")
    host = parts.hostname.lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if host not in allowed and f"{host}:{port}" not in allowed:
        shown = ", ".join(sorted(allowed)) or "none (set DIFY_LOCAL_WORKFLOW_HTTP_ALLOWED_HOSTS)"
        raise HttpNodeError(f"host {host!r} of {url!r} is not allowed; allowed hosts: {shown}")


def send(method: str, url: str, headers: dict[str, str], body: str | None, timeout: float,
         allowed: frozenset[str]) -> dict[str, Any]:
    """Send the request; the status, headers and body (as JSON when it parses) of the response."""
    if method not in METHODS:
        raise HttpNodeError(f"method {method!r} must be one of {', '.join(METHODS)}")
    check_url(url, allowed)
    data = body.encode("utf-8") if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _opener.open(request, timeout=min(timeout, MAX_TIMEOUT)) as response:
            status, response_headers, raw = response.status, response.headers, response.read(MAX_RESPONSE)
    except urllib.error.HTTPError as error:  # a 4xx/5xx/3xx is a response like any other
        status, response_headers, raw = error.code, error.headers, error.read(MAX_RESPONSE)
    except (urllib.error.URLError, OSError) as error:
        raise HttpNodeError(f"{method} {url} failed: {getattr(error, 'reason', error)}") from None
    except http.client.HTTPException as error:  # more than 100 headers, a line over 64 KB, a cut body
        raise HttpNodeError(f"{method} {url}: the response is not one http.client reads: "
                            f"{type(error).__name__}: {str(error)[:200]}") from None
    text = raw.decode("utf-8", "replace")
    result: dict[str, Any] = {"status_code": status, "body": text,
                              "headers": {key.lower(): value for key, value in response_headers.items()}}
    result["json"] = loads_or_none(text)  # (10,000 nested arrays raised RecursionError through the run)
    return result
