"""A channel on the app's broker for one read: the monitor's, the API's and the dashboard's."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

READ_TIMEOUT = 5.0  # seconds for the connection and for each answer: a read never hangs on a silent broker


@contextmanager
def read_channel(app) -> Iterator:
    """The default channel of a read connection, or kombu's OperationalError at once when the broker
    does not answer. One attempt: kombu's own retries (2 s, then 4 s, for broker_connection_timeout)
    held a health check, a page or a command six seconds on a broker that refused at once. Bounded
    answers: without a socket timeout, something on the broker's port that accepts and never answers
    (a hung broker) held the request, and the API thread answering it, for good."""
    timeouts = {"socket_timeout": READ_TIMEOUT, "socket_connect_timeout": READ_TIMEOUT}
    with app.connection_for_read(transport_options=timeouts) as connection:
        connection.ensure_connection(max_retries=0)
        yield connection.default_channel
