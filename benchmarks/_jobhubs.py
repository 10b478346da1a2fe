"""Simulated hubs that take AWS IoT Jobs executions, for the rollout benchmark.

The device side of AWS IoT Jobs over MQTT, as a hub's fleet-jobs loop (and the AWS Device
SDK's jobs client) speaks it: subscribe to ``jobs/notify-next``, ``jobs/start-next``'s and
``jobs/+/update``'s answers; publish ``start-next`` once after subscribing and whenever
notify-next names an execution; end each execution with ``jobs/{jobId}/update``
(SUCCEEDED or FAILED, as the benchmark asks, with ``expectedVersion``) and ask for the
next one until none is left. The connection, TLS and codec are ``benchmarks._hubs``'s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks import _mqtt as mqtt
from benchmarks._hubs import TIMEOUT, Hub, HubError, HubsSpec, Worker, _usage

ROLLBACK_SUFFIX = "-rollback"  # a deployment's rollback job: always succeeds here


def jobs_topic(thing: str, suffix: str) -> str:
    """``$aws/things/<thing>/jobs/<suffix>``."""
    return f"$aws/things/{thing}/jobs/{suffix}"


@dataclass
class Queue:
    """Where one hub is in its queue: a start-next in flight, and whether to ask again."""

    asking: bool = False
    again: bool = False


class JobsWorker(Worker):
    """Every hub of one process, taking jobs executions as they are announced."""

    def __init__(self, spec: HubsSpec) -> None:
        super().__init__(spec)
        self.fail_fraction = 0.0
        self.seed = 0
        self.queues: dict[str, Queue] = {}
        self.sent: dict[tuple[str, str], int] = {}  # (thing, job) -> ns the update was sent
        self.done: list[tuple[str, str, int, int]] = []  # job, status, sent ns, accepted ns
        self.notified: dict[str, int] = {}  # job -> notify-next messages naming it
        self.requests = 0  # start-next and update publishes
        self.rejected = 0

    # -- commands ------------------------------------------------------------------------
    async def subscribe_jobs(self, budget: float) -> dict[str, Any]:
        """Each hub subscribes to its jobs topics, then asks for its next execution."""

        async def one(thing: str) -> None:
            hub = self.hubs[thing]
            async with asyncio.timeout(TIMEOUT):
                pid = hub.packet_id()
                waiter = hub.expect(mqtt.SUBACK, pid)
                hub.send(
                    mqtt.subscribe(
                        pid,
                        [
                            (jobs_topic(thing, "notify-next"), 1),
                            (jobs_topic(thing, "start-next/accepted"), 1),
                            (jobs_topic(thing, "start-next/rejected"), 1),
                            (jobs_topic(thing, "+/update/accepted"), 1),
                            (jobs_topic(thing, "+/update/rejected"), 1),
                        ],
                    )
                )
                ack = await waiter
                if any(code >= 0x80 for code in ack.reasons):
                    raise HubError(f"SUBACK reasons {ack.reasons.hex()}")
                self.start_next(hub)

        failed, late = await self._each(list(self.hubs), one, budget)
        return {"failed": failed, "late": late}

    def outcome(self, fail_fraction: float, seed: int) -> dict[str, Any]:
        """From now on, a deployment's execution fails with this probability per hub."""
        self.fail_fraction, self.seed = fail_fraction, seed
        return {}

    def report(self) -> dict[str, Any]:
        """What happened since the last report (then forgotten)."""
        done, self.done = self.done, []
        notified, self.notified = self.notified, {}
        requests, self.requests = self.requests, 0
        rejected, self.rejected = self.rejected, 0
        return {"done": done, "notified": notified, "requests": requests, "rejected": rejected}

    # -- the device side of AWS IoT Jobs -------------------------------------------------
    def start_next(self, hub: Hub) -> None:
        """Publish ``start-next`` (QoS 1, no wait: the answer comes as a publish)."""
        queue = self.queues.setdefault(hub.thing, Queue())
        queue.asking, queue.again = True, False
        self.tokens += 1
        self._request(hub, "start-next", {"clientToken": f"s{self.tokens}"})

    def _request(self, hub: Hub, suffix: str, body: dict[str, Any]) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            hub.send(
                mqtt.publish(
                    jobs_topic(hub.thing, suffix), payload, qos=1, packet_id=hub.packet_id()
                )
            )
            self.requests += 1
        except HubError as err:
            self._error(hub, f"{suffix}: {err}")

    def _finish(self, hub: Hub, execution: dict[str, Any]) -> None:
        job_id = str(execution["jobId"])
        fails = not job_id.endswith(ROLLBACK_SUFFIX) and (
            random.Random(f"{self.seed}/{job_id}/{hub.thing}").random() < self.fail_fraction
        )
        status = "FAILED" if fails else "SUCCEEDED"
        self.tokens += 1
        self.sent[(hub.thing, job_id)] = time.monotonic_ns()
        self._request(
            hub,
            f"{job_id}/update",
            {
                "status": status,
                "expectedVersion": execution["versionNumber"],
                "statusDetails": {"reason": "simulated"} if fails else {},
                "clientToken": f"u{self.tokens}:{status}",
            },
        )

    def on_publish(self, hub: Hub, packet: mqtt.Packet) -> None:
        """A jobs answer or notification: take the next step of this hub's queue."""
        now = time.monotonic_ns()
        prefix = jobs_topic(hub.thing, "")
        if not packet.topic.startswith(prefix):
            return
        suffix = packet.topic[len(prefix) :]
        try:
            body = json.loads(packet.payload)
        except ValueError:
            self._error(hub, f"{suffix}: not JSON")
            return
        queue = self.queues.setdefault(hub.thing, Queue())
        execution = body.get("execution")
        if suffix == "notify-next":
            if execution:
                job_id = str(execution["jobId"])
                self.notified[job_id] = self.notified.get(job_id, 0) + 1
                if queue.asking:
                    queue.again = True
                else:
                    self.start_next(hub)
        elif suffix == "start-next/accepted":
            if execution:
                self._finish(hub, execution)
            elif queue.again:
                self.start_next(hub)
            else:
                queue.asking = False
        elif suffix.endswith("/update/accepted"):
            job_id = suffix[: -len("/update/accepted")]
            sent = self.sent.pop((hub.thing, job_id), now)
            status = str(body.get("clientToken", ":?")).rsplit(":", 1)[1]
            self.done.append((job_id, status, sent, now))
            self.start_next(hub)
        elif suffix.endswith("/rejected"):
            self.rejected += 1
            self._error(hub, f"{suffix}: {packet.payload[:200]!r}")
            if suffix.endswith("/update/rejected"):
                self.start_next(hub)
            else:
                queue.asking = False

    def _error(self, hub: Hub, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(f"{hub.thing}: {what}")


def serve(conn: Connection, spec: HubsSpec) -> None:
    """A worker process's main: run the commands the benchmark sends until "exit"."""
    asyncio.run(_serve(conn, spec))


async def _serve(conn: Connection, spec: HubsSpec) -> None:
    worker = JobsWorker(spec)
    pinger = asyncio.create_task(worker.keepalive(), name="keepalive")
    try:
        conn.send({"ready": True, **_usage()})
        while True:
            command, args = await asyncio.to_thread(conn.recv)
            if command == "exit":
                return
            before = _usage()
            if command == "connect":
                result = await worker.connect_all(**args)
            elif command == "subscribe-jobs":
                result = await worker.subscribe_jobs(**args)
            elif command == "outcome":
                result = worker.outcome(**args)
            elif command == "report":
                result = worker.report()
            elif command == "disconnect":
                result = await worker.disconnect_all()
            else:
                raise ValueError(f"unknown command {command!r}")
            after = _usage()
            result.update(
                cpu_s=after["cpu_s"] - before["cpu_s"],
                rss_kb=after["rss_kb"],
                errors=list(worker.errors[:20]),
                connected=len(worker.connected),
            )
            worker.errors.clear()
            conn.send(result)
    finally:
        pinger.cancel()
        for hub in list(worker.open):
            hub.close()


__all__ = ["JobsWorker", "jobs_topic", "serve"]
