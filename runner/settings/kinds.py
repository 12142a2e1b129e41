"""Value kinds: how one setting's raw text becomes a typed value, and what is allowed.

Each kind parses a string (from a file, the environment or the command line) and raises
`ValueError` whose message is the allowed form, so the caller can build one line that names the
variable, the value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


# The ceiling of every number setting without a maximum of its own: what the things they end in all
# take (a timeout, a timedelta, a SQLite or Redis integer); 10**23 used to pass and then crash a role.
LARGEST = 2**31 - 1


class Kind:
    """Base kind: free text."""

    allowed = "any text"

    def parse(self, raw: str) -> Any:
        return raw

    def format(self, value: Any) -> str:
        """The value as it would be written in a .env file."""
        if value is None:
            return ""
        return str(value)


class Text(Kind):
    pass


class Boolean(Kind):
    allowed = "true or false (also 1/0, yes/no, on/off)"

    def parse(self, raw: str) -> bool:
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(self.allowed)

    def format(self, value: Any) -> str:
        return "true" if value else "false"


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int | None = None
    maximum: int | None = None

    @property
    def allowed(self) -> str:  # type: ignore[override]
        if self.minimum is not None and self.maximum is not None:
            return f"a whole number from {self.minimum} to {self.maximum}"
        if self.minimum == 0:
            return "a whole number, 0 or more"
        if self.minimum is not None:
            return f"a whole number, {self.minimum} or more"
        return "a whole number"

    def parse(self, raw: str) -> int:
        text = raw.strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,30}", text):
            raise ValueError(self.allowed)
        value = int(text)
        if self.minimum is not None and value < self.minimum:
            raise ValueError(self.allowed)
        if self.maximum is not None and value > self.maximum:
            raise ValueError(self.allowed)
        if value > LARGEST:
            raise ValueError(f"{self.allowed}, at most {LARGEST}")
        return value


@dataclass(frozen=True)
class PositiveNumber(Kind):
    unit: str = "seconds, e.g. 0.1"

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"a number greater than 0 ({self.unit})"

    def parse(self, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(self.allowed) from None
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError(self.allowed)
        if value > LARGEST:
            raise ValueError(f"{self.allowed}, at most {LARGEST}")
        return value


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]
    case_sensitive: bool = False

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def parse(self, raw: str) -> str:
        text = raw.strip()
        for choice in self.choices:
            if text == choice or (not self.case_sensitive and text.lower() == choice.lower()):
                return choice
        raise ValueError(self.allowed)


@dataclass(frozen=True)
class NameList(Kind):
    """A comma-separated list drawn from a fixed set of names (queue names)."""

    names: tuple[str, ...]
    what: str = "name"

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"a comma-separated list of {self.what}s from: " + ", ".join(self.names)

    def parse(self, raw: str) -> tuple[str, ...]:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items:
            raise ValueError(self.allowed)
        unknown = [item for item in items if item not in self.names]
        if unknown:
            raise ValueError(f"unknown {self.what} {unknown[0]!r}; allowed: " + ", ".join(self.names))
        return tuple(dict.fromkeys(items))

    def format(self, value: Any) -> str:
        return ",".join(value)


QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")


class QueueList(Kind):
    """Comma-separated queue names, any the app the worker runs may have: which names a worker may
    consume is the app's to say (runner.topology for our backend, the project's own app otherwise)."""

    allowed = "a comma-separated list of queue names (letters, digits and _ . : @ -)"

    def parse(self, raw: str) -> tuple[str, ...]:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items or not all(QUEUE_NAME.fullmatch(item) for item in items):
            raise ValueError(self.allowed)
        return tuple(dict.fromkeys(items))

    def format(self, value: Any) -> str:
        return ",".join(value)


# The domain as dot-separated labels that hold no dot: `[^@\s,]+\.[^@\s,]+$` let the two parts share
# the dots, and "a@" + ".a" * 4000 + "@" took a second (quadratic: a task's `to` of 1 MB, hours).
# At most 254 characters, as SMTP allows.
EMAIL = re.compile(r"^(?=[^\n]{1,254}$)[^@\s,]+@[^@\s,.]+(?:\.[^@\s,.]+)+$")


class EmailList(Kind):
    allowed = "a comma-separated list of e-mail addresses (name@example.com)"

    def parse(self, raw: str) -> tuple[str, ...]:
        items = [item.strip() for item in raw.split(",") if item.strip()]
        bad = [item for item in items if not EMAIL.match(item)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an e-mail address; allowed: {self.allowed}")
        return tuple(items)

    def format(self, value: Any) -> str:
        return ",".join(value)


class MailSender(Kind):
    """A From address, bare or with a display name: `Dify <no-reply@example.com>`."""

    allowed = "an e-mail address, optionally with a name: Name <name@example.com>"

    def parse(self, raw: str) -> str:
        from email.utils import parseaddr

        text = raw.strip()
        name, address = parseaddr(text)
        if not EMAIL.match(address) or "\n" in text or "\r" in text:
            raise ValueError(self.allowed)
        return text


BROKER_SCHEMES = ("redis", "rediss", "sentinel")


class BrokerUrl(Kind):
    """A Redis broker URL, or several `;`-separated sentinel URLs (as kombu takes them)."""

    allowed = (
        "empty (the embedded broker), or redis://[:password@]host:port/db, rediss://… (TLS), "
        "or sentinel://[:password@]host:port[;sentinel://…] (with CELERY_USE_SENTINEL=true)"
    )

    def parse(self, raw: str) -> str:
        text = raw.strip()
        parts = [part.strip() for part in text.split(";") if part.strip()]
        if not parts:
            raise ValueError(self.allowed)
        schemes = set()
        for part in parts:
            try:
                split = urlsplit(part)
                split.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(self.allowed) from None
            if split.scheme not in BROKER_SCHEMES:
                shown = split.scheme or "(none)"
                raise ValueError(f"unknown scheme {shown!r}; allowed: {self.allowed}")
            if not split.hostname:
                raise ValueError(f"no host in the URL; allowed: {self.allowed}")
            schemes.add(split.scheme)
        if len(parts) > 1 and schemes != {"sentinel"}:
            raise ValueError(f"only sentinel:// URLs may be joined with ';'; allowed: {self.allowed}")
        return ";".join(parts)


class FilePath(Kind):
    """A path to a file; a relative one is taken from the project folder (see Settings.path)."""

    allowed = "a path to a file (absolute, or relative to the project folder)"

    def parse(self, raw: str) -> str:
        text = raw.strip()
        if "\0" in text or "\n" in text:
            raise ValueError(self.allowed)
        return text


class BindAddress(Kind):
    allowed = "an IP address to listen on (127.0.0.1, ::1, or another local address)"

    def parse(self, raw: str) -> str:
        text = raw.strip()
        if text == "localhost":
            return "127.0.0.1"
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(self.allowed) from None
        return text


def host_port(host: str, port: int) -> str:
    """host:port as URLs and Redis write it ([host]:port for IPv6)."""
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


MASK = "****"


PASSWORD_IN_URL = re.compile(r"(://[^:/@;]*:)([^@/;]+)(@)")
PASSWORD_OPTION = re.compile(r"((?:--[\w-]*password|-a)(?:=|\s+))(\S+)")  # -a: redis-cli


def mask_url(url: str) -> str:
    """Hide the password of each `;`-separated URL; everything else stays readable, even in a
    URL too broken to parse."""
    return PASSWORD_IN_URL.sub(rf"\g<1>{MASK}\g<3>", url)


def mask_command(command: str) -> str:
    """A command line with its URL passwords and `--…password VALUE` arguments hidden."""
    return PASSWORD_OPTION.sub(rf"\g<1>{MASK}", mask_url(command))
