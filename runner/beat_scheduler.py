"""Beat's scheduler: Celery's persistent one, plus a heartbeat on the broker at every tick.

The heartbeat is how `up` knows beat is running (it has ticked) and how later checks tell a stale
or a second beat: one key on the broker, so it works for the embedded broker and real Redis alike.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from celery.beat import PersistentScheduler

from runner.broker_config import BEAT_HEARTBEAT_KEY, beat_instance_key

log = logging.getLogger("dify_local.beat")

HEARTBEAT_TTL = 60  # seconds; a beat that stopped ticking disappears from the broker after this


class HeartbeatScheduler(PersistentScheduler):
    _heartbeat_connection = None

    def tick(self, *args, **kwargs):
        interval = super().tick(*args, **kwargs)
        self._heartbeat()
        return interval

    def _heartbeat(self) -> None:
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "at": time.time(),
                            "interval": self.max_interval})
        try:
            if self._heartbeat_connection is None:
                self._heartbeat_connection = self.app.connection_for_write()
            client = self._heartbeat_connection.default_channel.client
            client.set(BEAT_HEARTBEAT_KEY, value, ex=self._heartbeat_ttl())
            self._instance_heartbeat(client, value)
        except Exception as error:  # the broker may be restarting: retry at the next tick
            log.warning("could not write beat's heartbeat: %s", error)
            self._close_heartbeat()

    def _heartbeat_ttl(self) -> int:
        # outlive the longest wait between ticks (max_interval), which may be above HEARTBEAT_TTL
        return max(HEARTBEAT_TTL, int(3 * self.max_interval))

    def _instance_heartbeat(self, client, value: str) -> None:
        """This beat's own key beside the shared one: two beats on one broker (each sending every
        periodic task) show as two keys to `doctor`. Removed when this beat stops."""
        client.set(beat_instance_key(socket.gethostname(), os.getpid()), value, ex=self._heartbeat_ttl())

    def _forget_instance(self) -> None:
        try:
            if self._heartbeat_connection is not None:
                self._heartbeat_connection.default_channel.client.delete(
                    beat_instance_key(socket.gethostname(), os.getpid()))
        except Exception:  # broker gone: the key expires on its own
            pass

    def _close_heartbeat(self) -> None:
        if self._heartbeat_connection is not None:
            try:
                self._heartbeat_connection.release()
            except Exception:
                pass
            self._heartbeat_connection = None

    def close(self):
        self._forget_instance()
        self._close_heartbeat()
        super().close()
