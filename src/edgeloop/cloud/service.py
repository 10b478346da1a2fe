"""`edgeloop cloud up`: the API, the database, the object store, the broker, and the MQTT
services (shadows, connectivity, provisioning by claim) as one running install.

Everything of an embedded install lives in one data folder, and a restart resumes it:
the CA, the database (SQLite by default), objects, the broker's persistence and ports. The
endpoints are written to ``<data>/endpoints.json`` for the CLI and for hubs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import signal
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from edgeloop.cloud.apiauth import TOKEN_FILE, ApiAuth, TlsAwareH11Protocol, load_or_create_token
from edgeloop.cloud.broker import AclRules, Broker, BrokerConfig, ServiceLogin
from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.jobs_service import REQUEST_FILTERS as JOB_REQUEST_FILTERS
from edgeloop.cloud.jobs_service import JobsService, is_request_topic
from edgeloop.cloud.lake_mqtt import LakeMqttIngest
from edgeloop.cloud.provisioning import (
    REQUEST_FILTERS,
    ROTATE_FILTER,
    ClientIdentity,
    ProvisioningService,
    parse_request_topic,
)
from edgeloop.cloud.registry import ConnectivityEvent
from edgeloop.cloud.shadow_service import REQUEST_FILTER, ShadowService
from edgeloop.core.errors import CloudError
from edgeloop.core.names import is_thing_name

log = logging.getLogger("edgeloop.cloud")

CONNECTIVITY_FILTER = "edgeloop/things/+/connectivity"
# A request's MQTT 5 Response Topic honoured for its answers: under edgeloop/replies/<client
# id>/, which the broker lets that client id alone read (broker.PRIVATE_REPLY_PATTERN).
PRIVATE_REPLY_TOPIC = re.compile(r"^edgeloop/replies/[^/+#\x00]+/[^+#\x00]+$")
ENDPOINTS_FILE = "endpoints.json"
CLAIM_TEMPLATE_POLL = 1.0  # seconds between looks for claim templates new to the broker
MAX_INFLIGHT = 1000  # unacknowledged QoS 1 publishes of the services
CONNECTIVITY_BATCH = 1000  # connects and disconnects recorded in one transaction
SERVICES_SESSION_EXPIRY = 7 * 24 * 3600  # seconds the broker keeps the services' session
LAKE_UPKEEP = 3600.0  # seconds between compactions of the lake
ROLLOUT_TICK = 1.0  # seconds between steps of the fleet's rollouts
JOBS_SWEEP_SECONDS = 5.0  # between looks for job executions whose timer ran out


def connectivity_topic(thing: str) -> str:
    """Where a hub publishes its retained birth message and sets its last will."""
    return f"edgeloop/things/{thing}/connectivity"


@dataclass(frozen=True)
class CloudSettings:
    """How `cloud up` runs."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8440  # the API's; the broker's ports are chosen just above it
    db_url: str | None = None
    s3_endpoint: str | None = None
    tls: bool = False  # HTTPS, with things' certificates and the operator token
    broker_autosave: int = 1  # changes between saves of the broker's database


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it).

    Every connected hub holds one of the broker's file descriptors; a default soft limit
    of 1,024 would refuse the 1,021st hub.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as err:
            log.warning("could not raise the open-file limit from %d: %s", soft, err)
    return soft


class MqttServices:
    """The cloud's own MQTT client: shadows, jobs, connectivity and provisioning by claim.

    paho runs its network loop in a thread. Shadow requests are handed to the event loop,
    where the shadow book (shared with the API) lives; connectivity goes straight to the
    registry, which is thread-safe; fleet-provisioning and rotation requests run in worker
    threads, as a pre-provisioning hook may take seconds.

    Provisioning trusts the topic for who asks: the broker's ACL lets only claims of
    template T write the create topics and T's provision topic, and only the certificate
    CN X write ``edgeloop/certificates/X/rotate``. CreateKeysAndCertificate is refused
    unless ``allow_create_keys``: its answer carries a private key and, MQTT having no
    reply-to-one-connection, reaches every connected claim holder. Answers echo the
    request's MQTT 5 correlation data, so that concurrent devices tell theirs apart.
    """

    def __init__(
        self,
        ctx: CloudContext,
        login: ServiceLogin,
        loop: asyncio.AbstractEventLoop,
        *,
        allow_create_keys: bool = False,
        provisioning_workers: int = 4,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.ctx = ctx
        self.loop = loop
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="edgeloop-cloud-services",
            protocol=mqtt.MQTTv5,
        )
        self.client.username_pw_set(login.username, login.password)
        # paho's default of 20 unacknowledged QoS 1 publishes caps every answer the
        # services send (shadow documents, job notifications) at a few hundred a second.
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._login = login
        self.shadows = ShadowService(ctx.shadows, self._publish)
        self.provisioning = ProvisioningService(
            ctx, self._publish_answer, allow_create_keys=allow_create_keys
        )
        self._workers = ThreadPoolExecutor(provisioning_workers, "provisioning")
        self._request = threading.local()  # the request a worker answers (correlation)
        self.connected = asyncio.Event()
        # Jobs requests are served in order, one at a time, off the event loop (each is a
        # database transaction); timeouts are swept by a thread of their own.
        self.jobs = JobsService(ctx.jobs, self._publish)
        # Stored before on_message returns, so the broker's copy goes only once it is kept.
        self.lake_ingest = LakeMqttIngest(ctx.lake, ctx.data_dir / "lake-inbox")
        self._jobs_worker = ThreadPoolExecutor(1, "jobs")
        self._jobs_stop = threading.Event()
        self._jobs_sweeper = threading.Thread(
            target=self._sweep_jobs, name="jobs-timeouts", daemon=True
        )
        self._connectivity: queue.SimpleQueue[ConnectivityEvent | None] = queue.SimpleQueue()
        # Connectivity has a client of its own with a clean session: it wants the fleet's
        # latest state (the retained birth or will of each hub, on every (re)subscribe),
        # never the wills a persistent session would have queued while it was away — those
        # would arrive after the births of the hubs' newer connections.
        self.presence = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="edgeloop-cloud-connectivity",
            protocol=mqtt.MQTTv5,
        )
        self.presence.username_pw_set(login.username, login.password)
        self.presence.on_connect = self._on_presence_connect
        self.presence.on_message = lambda c, u, m: self._record_connectivity(
            m.topic, bytes(m.payload)
        )
        self._connectivity_writer = threading.Thread(
            target=self._write_connectivity, name="connectivity", daemon=True
        )

    def start(self) -> None:
        """Connect (and keep reconnecting) in paho's thread."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        # A persistent session: what hubs published while the services were away (QoS 1
        # telemetry, requests) waits in the broker's persistence for them.
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SERVICES_SESSION_EXPIRY
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)
        self.client.connect_async(
            self._login.host,
            self._login.port,
            keepalive=30,
            clean_start=False,
            properties=properties,
        )
        self.client.loop_start()
        self.presence.reconnect_delay_set(min_delay=1, max_delay=5)
        self.presence.connect_async(self._login.host, self._login.port, keepalive=30)
        self.presence.loop_start()
        self._jobs_sweeper.start()
        self._connectivity_writer.start()

    def stop(self) -> None:
        """Disconnect and end paho's thread."""
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._jobs_stop.set()
        if self._jobs_sweeper.is_alive():
            self._jobs_sweeper.join()
        self._jobs_worker.shutdown(wait=True, cancel_futures=True)
        self._connectivity.put(None)
        if self._connectivity_writer.is_alive():
            self._connectivity_writer.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        self.presence.disconnect()
        self.presence.loop_stop()

    def _on_presence_connect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.error("the connectivity service could not log in to the broker: %s", reason)
            return
        client.subscribe(CONNECTIVITY_FILTER, qos=1)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def _publish_answer(self, topic: str, payload: bytes) -> None:
        reply = getattr(self._request, "reply", None)
        if reply is not None:  # the asker's private reply topic, instead of the shared one
            topic = f"{reply}/{topic.rsplit('/', 1)[1]}"
        correlation = getattr(self._request, "correlation", None)
        if correlation is None:
            self._publish(topic, payload)
            return
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=properties)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("cloud services could not log in to the broker: %s", reason)
            return
        # The request topics only: answers to them are published here, not served.
        provisioning = [(topic, 1) for topic in (*REQUEST_FILTERS, ROTATE_FILTER)]
        jobs = [(topic, 1) for topic in JOB_REQUEST_FILTERS]
        client.unsubscribe(
            CONNECTIVITY_FILTER
        )  # now the connectivity client's; older sessions kept it
        client.subscribe(
            [
                (REQUEST_FILTER, 1),
                (LakeMqttIngest.topic_filter, 1),
                *provisioning,
                *jobs,
            ]
        )
        self.loop.call_soon_threadsafe(self.connected.set)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic: str = message.topic
        payload: bytes = message.payload
        if self.lake_ingest.handles(topic):  # first: a stream may be named "connectivity"
            self.lake_ingest.handle(topic, payload)
        elif is_request_topic(topic):
            with contextlib.suppress(RuntimeError):  # stopping: the device will ask again
                self._jobs_worker.submit(self._serve_jobs, topic, payload)
        elif topic.startswith("$aws/things/"):
            # Served in batches on the loop, one database write for all that are waiting.
            self.loop.call_soon_threadsafe(self.shadows.submit, topic, payload)
        else:
            props = getattr(message, "properties", None)
            correlation = getattr(props, "CorrelationData", None) if props else None
            reply = getattr(props, "ResponseTopic", None) if props else None
            if reply is not None and not PRIVATE_REPLY_TOPIC.match(reply):
                # Anything else could make the cloud publish where the asker may not.
                log.warning("ignored response topic %r of a request on %s", reply, topic)
                reply = None
            self._workers.submit(self._serve_provisioning, topic, payload, correlation, reply)

    def _serve_provisioning(
        self, topic: str, payload: bytes, correlation: bytes | None, reply: str | None = None
    ) -> None:
        request = parse_request_topic(topic)
        if request is None:
            return
        if request.operation == "rotate":
            assert request.common_name is not None
            client = ClientIdentity("thing", request.common_name)
        else:
            # "": which claim sent a create request, the topic does not say.
            client = ClientIdentity("claim", request.template or "")
        self._request.correlation = correlation
        self._request.reply = reply
        try:
            self.provisioning.handle(topic, payload, client=client)
        except Exception:
            log.exception("provisioning request on %s failed", topic)
        finally:
            self._request.correlation = None
            self._request.reply = None

    def _serve_jobs(self, topic: str, payload: bytes) -> None:
        try:
            self.jobs.handle(topic, payload)
        except Exception:
            log.exception("jobs request on %s failed", topic)

    def _sweep_jobs(self) -> None:
        while not self._jobs_stop.wait(JOBS_SWEEP_SECONDS):
            try:
                timed_out = self.ctx.jobs.sweep_timeouts()
            except Exception:
                log.exception("could not time out job executions")
                continue
            for change in timed_out:
                log.info(
                    "job %s on %s timed out: %s", change.job_id, change.thing_name, change.reason
                )

    def _record_connectivity(self, topic: str, payload: bytes) -> None:
        thing = topic.split("/")[2]
        if not is_thing_name(thing):
            return
        try:
            doc = json.loads(payload) if payload else {}
        except ValueError:
            log.warning("ignored a connectivity message of %s that is not JSON", thing)
            return
        if not isinstance(doc, dict) or not isinstance(doc.get("connected"), bool):
            log.warning("ignored a connectivity message of %s without 'connected'", thing)
            return
        at = datetime.now(UTC)
        if isinstance(doc.get("at"), int | float) and doc["connected"]:
            # A birth message says when the hub connected; a last will cannot know when
            # it will be sent, so the broker's delivery time stands for it.
            at = datetime.fromtimestamp(doc["at"] / 1000, UTC)
        # A will names the connection it ends; a late one of a replaced connection is
        # ignored by the registry.
        ends = None
        if not doc["connected"] and isinstance(doc.get("connection"), int | float):
            ends = datetime.fromtimestamp(doc["connection"] / 1000, UTC)
        # Written by a thread of its own, in batches: paho's network thread must keep
        # reading, or the broker's queue for the services overflows during a connect storm.
        self._connectivity.put(
            ConnectivityEvent(
                thing,
                doc["connected"],
                at,
                client_id=str(doc.get("clientId") or thing),
                reason=None if doc["connected"] else str(doc.get("reason") or "connection lost"),
                connection=ends,
            )
        )

    def _write_connectivity(self) -> None:
        while True:
            first = self._connectivity.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < CONNECTIVITY_BATCH:
                try:
                    more = self._connectivity.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._connectivity.put(None)  # stop after this batch
                    break
                batch.append(more)
            try:
                self.ctx.registry.set_connectivity_many(batch)
            except Exception:
                log.exception("connectivity of %d things not recorded", len(batch))


def _certificate_facts(ctx: CloudContext, certificate_id: str) -> tuple[str, str | None, str]:
    cert = ctx.registry.get_certificate(certificate_id)
    return cert.kind, cert.thing, cert.status


def claim_templates(ctx: CloudContext) -> tuple[str, ...]:
    """Names of the registry's claim templates, for the broker's ACL."""
    from sqlalchemy import select

    from edgeloop.cloud.db import ClaimTemplateRow

    # The registry has no listing of templates yet; this reads its table directly.
    with ctx.registry.db.read() as session:
        return tuple(sorted(session.scalars(select(ClaimTemplateRow.name))))


async def follow_claim_templates(ctx: CloudContext, broker: Broker) -> None:
    """Keep the broker's ACL listing every claim template (templates made by the API too).

    The API creates templates without telling anyone (it holds no broker), so this looks
    every CLAIM_TEMPLATE_POLL seconds: a claim made through the API can be used about a
    second later. The query reads one small table.
    """
    while True:
        await asyncio.sleep(CLAIM_TEMPLATE_POLL)
        try:
            names = await asyncio.to_thread(claim_templates, ctx)
            if names != broker.cfg.acl.claim_templates:
                await broker.reload(acl=replace(broker.cfg.acl, claim_templates=names))
                log.info("the broker now admits claims of templates %s", ", ".join(names))
        except Exception:
            log.exception("could not bring the broker's claim templates up to date")


async def maintain_lake(ctx: CloudContext, interval: float = LAKE_UPKEEP) -> None:
    """Compact the lake's small files (and collect its garbage) every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(ctx.lake.compact)
        except Exception:
            log.exception("the lake could not be compacted; trying again later")


async def drive_rollouts(ctx: CloudContext, interval: float = ROLLOUT_TICK) -> None:
    """Advance the fleet's rollouts every ``interval`` seconds, for as long as the cloud runs."""
    engine = ctx.deployments
    while True:
        try:
            await asyncio.to_thread(engine.tick)
        except Exception:
            log.exception("rollouts could not advance; trying again")
        await asyncio.sleep(interval)


def _server_identity(ctx: CloudContext, folder: Path, host: str) -> tuple[Path, Path]:
    """The broker's TLS certificate and key, issued once and kept."""
    cert, key = folder / "server.pem", folder / "server.key"
    if not cert.exists() or not key.exists():
        folder.mkdir(parents=True, exist_ok=True)
        issued = ctx.ca.issue_server_certificate(["localhost"], sorted({host, "127.0.0.1"}))
        assert issued.private_key_pem is not None
        key.write_bytes(issued.private_key_pem)
        key.chmod(0o600)
        cert.write_bytes(issued.certificate_pem + issued.chain_pem)
    return cert, key


class Cloud:
    """A running install: start it, serve until told to stop, stop it."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.ctx: CloudContext | None = None
        self.broker: Broker | None = None
        self.services: MqttServices | None = None
        self._api: Any = None
        self._api_task: asyncio.Task[None] | None = None
        self._templates_task: asyncio.Task[None] | None = None
        self._rollouts_task: asyncio.Task[None] | None = None
        self._lake_task: asyncio.Task[None] | None = None

    async def start(self) -> dict[str, Any]:
        """Bring everything up; returns the endpoints (also written to endpoints.json).

        On any failure what was started is stopped again, and a CloudError says why.
        """
        if not self.settings.tls and not _is_loopback(self.settings.host):
            raise CloudError(
                f"the API would be plain HTTP without authentication on {self.settings.host}: "
                "serve it beyond loopback with --tls (HTTPS, things' certificates and the "
                "operator token)"
            )
        _check_port_free(self.settings.host, self.settings.port)
        raise_open_file_limit()
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> dict[str, Any]:
        import uvicorn

        from edgeloop.cloud.api import create_app
        from edgeloop.cloud.objectstore import open_object_store

        s = self.settings
        objects = open_object_store(s.data_dir, s3_endpoint=s.s3_endpoint)
        ctx = await asyncio.to_thread(
            CloudContext.open, s.data_dir, db_url=s.db_url, objects=objects
        )
        self.ctx = ctx
        broker_dir = s.data_dir / "broker"
        cert, key = _server_identity(ctx, broker_dir, s.host)
        broker_dir.mkdir(parents=True, exist_ok=True)
        (broker_dir / "crl.pem").write_bytes(ctx.crl_pem())
        self.broker = Broker(
            BrokerConfig(
                data_dir=broker_dir,
                ca_chain=ctx.ca.chain_path,
                server_cert=cert,
                server_key=key,
                host=s.host,
                base_port=s.port + 1,
                acl=AclRules(claim_templates=await asyncio.to_thread(claim_templates, ctx)),
                autosave_changes=s.broker_autosave,
            )
        )
        ports = await self.broker.start()
        broker = self.broker

        async def revoked() -> None:
            await broker.update_crl(ctx.crl_pem())

        ctx.revoked = revoked
        self.services = MqttServices(ctx, broker.service_login, asyncio.get_running_loop())
        self.services.start()
        try:
            async with asyncio.timeout(10):
                await self.services.connected.wait()
        except TimeoutError as err:
            raise CloudError("the cloud's services could not connect to its broker") from err
        self._templates_task = asyncio.create_task(
            follow_claim_templates(ctx, broker), name="claim-templates"
        )
        self._rollouts_task = asyncio.create_task(drive_rollouts(ctx), name="rollouts")
        self._lake_task = asyncio.create_task(maintain_lake(ctx), name="lake-upkeep")

        token = await asyncio.to_thread(load_or_create_token, s.data_dir)
        app: Any = create_app(ctx)
        tls: dict[str, Any] = {}
        if s.tls:
            app = ApiAuth(app, token=token, lookup=partial(_certificate_facts, ctx))
            tls = {
                "http": TlsAwareH11Protocol,
                "ssl_certfile": str(cert),
                "ssl_keyfile": str(key),
                "ssl_ca_certs": str(ctx.ca.chain_path),
                "ssl_cert_reqs": ssl.CERT_OPTIONAL,
            }
        config = uvicorn.Config(
            app, host=s.host, port=s.port, log_level="warning", lifespan="off", **tls
        )
        self._api = uvicorn.Server(config)
        api = self._api

        async def serve_api() -> None:
            with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
                await api.serve()

        self._api_task = asyncio.create_task(serve_api(), name="api")
        async with asyncio.timeout(10):
            while not self._api.started:
                if self._api_task.done():
                    raise CloudError(
                        f"the API could not listen on {s.host}:{s.port} (is the port in use?)"
                    )
                await asyncio.sleep(0.02)
        endpoints = {
            "api": f"{'https' if s.tls else 'http'}://{s.host}:{s.port}",
            "tokenFile": str(s.data_dir / TOKEN_FILE),
            "mqtt": {"host": ports.host, "port": ports.device},
            "caFile": str(ctx.ca.chain_path),
            "dataDir": str(s.data_dir),
        }
        (s.data_dir / ENDPOINTS_FILE).write_text(json.dumps(endpoints, indent=1) + "\n")
        return endpoints

    async def stop(self) -> None:
        """Stop the API, the services and the broker."""
        if self._api is not None:
            self._api.should_exit = True
            if self._api_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._api_task, 10)
        for task in (self._templates_task, self._rollouts_task, self._lake_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.services is not None:
            self.services.stop()
        if self.broker is not None:
            await self.broker.stop()

    async def serve_forever(self, on_ready: Callable[[dict[str, Any]], None]) -> None:
        """Start, report, and run until SIGINT/SIGTERM."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            on_ready(await self.start())
            await stop.wait()
        finally:
            await self.stop()


def _check_port_free(host: str, port: int) -> None:
    """Refuse early, before the broker starts, when the API's port is taken."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise CloudError(
                f"the API port {host}:{port} is not free ({err.strerror}); choose another "
                "with --port"
            ) from err


def read_endpoints(data_dir: Path) -> dict[str, Any]:
    """The endpoints a running (or last run) install wrote; CloudError when there are none."""
    path = data_dir / ENDPOINTS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CloudError(
            f"no cloud has run from {data_dir} (start one with: edgeloop cloud up "
            f"--data-dir {data_dir})"
        ) from err
    return data
