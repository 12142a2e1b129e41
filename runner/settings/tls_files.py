"""Checks of the TLS files named for the broker (REDIS_SSL_*): each one there and loadable, so a
wrong path stops every command with one line instead of a handshake error in every process."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Callable

CA_HINT = "name the PEM file of the CA that signed the Redis server's certificate"
CLIENT_HINT = "name a PEM client certificate and its unencrypted key (REDIS_SSL_KEYFILE)"


def tls_file_problems(settings: Any) -> list[str]:
    """One line per TLS file that is missing or does not load; none while TLS is off (a Dify .env
    may name files for its own Redis that this machine does not have)."""
    if not settings.uses_ssl:
        return []
    ca, cert, key = (settings.path(name) for name in ("REDIS_SSL_CA_CERTS", "REDIS_SSL_CERTFILE", "REDIS_SSL_KEYFILE"))
    problems = []
    if ca is not None:
        problems += _problem("REDIS_SSL_CA_CERTS", ca, lambda: ssl.create_default_context(cafile=str(ca)), CA_HINT)
    if key is not None and cert is None:
        problems.append(f"REDIS_SSL_KEYFILE={str(key)!r} is not allowed without REDIS_SSL_CERTFILE: "
                        "name the client certificate the key belongs to")
    elif cert is not None:
        if key is not None and not key.is_file():
            problems.append(f"REDIS_SSL_KEYFILE={str(key)!r} is not allowed: no such file; {CLIENT_HINT}")
        else:
            problems += _problem("REDIS_SSL_CERTFILE", cert, lambda: _load_client_pair(cert, key), CLIENT_HINT)
    return problems


def _load_client_pair(cert: Path, key: Path | None) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # A password callback, so an encrypted key fails here instead of prompting on the terminal.
    context.load_cert_chain(str(cert), str(key) if key else None, password=lambda: b"")


def _problem(name: str, path: Path, load: Callable[[], object], hint: str) -> list[str]:
    if not path.is_file():
        return [f"{name}={str(path)!r} is not allowed: no such file; {hint}"]
    try:
        load()
    except ssl.SSLError as error:
        # OpenSSL's reason (NO_CERTIFICATE_OR_CRL_FOUND, KEY_VALUES_MISMATCH …), or none at all
        # when a certificate comes without its key
        reason = error.reason.replace("_", " ").lower() if error.reason else "not PEM, or no key for it"
        return [f"{name}={str(path)!r} is not allowed: it does not load ({reason}); {hint}"]
    except OSError as error:
        return [f"{name}={str(path)!r} is not allowed: {error.strerror or error}; {hint}"]
    return []
