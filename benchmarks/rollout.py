"""Fleet deployment benchmarks: a rollout to thousands of simulated hubs, an abort, and
a deployment to one real hub.

The cloud runs as ``edgeloop cloud up`` runs it (``benchmarks.cloud``'s runner, a process
of its own, ticking rollouts every second). Simulated hubs (``benchmarks._jobhubs``: AWS
IoT Jobs' device side over MQTT 5 and mutual TLS, thousands per worker process) take the
executions; deployments are made and followed over the REST API, as an operator would.

Rows: one version rolled out to every hub at the fastest rate (create until every
execution SUCCEEDED); an abort (half the hubs report FAILED; from the moment the abort
criterion held, by the executions' own timestamps, to the deployment's ``aborted``
event); and create → SUCCEEDED on a real hub agent process in a group of its own.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _jobhubs
from benchmarks._report import Result, SuiteResult, Target
from benchmarks.cloud import (
    CONCURRENCY,
    STORM_BUDGET,
    Fleet,
    Hubs,
    _cpu,
    make_fleet,
    raise_fd_limit,
    start_cloud,
    stop_cloud,
)
from benchmarks.edge_runtime import BenchmarkError, Workspace

HUBS = 10_000
WORKERS = 2
GROUP = "bench-fleet"
REAL_GROUP = "bench-real"
REAL_THING = "bench-real-hub"
FLEET_COMPONENT = "edgeloop.bench.FleetApp"
REAL_COMPONENT = "edgeloop.bench.Sleeper"
REAL_VERSIONS = ("1.0.0", "1.0.1")
REAL_RUNS = 5
HEALTH_WINDOW = 1.0  # seconds a hub waits with every component up before SUCCEEDED
FASTEST = 60_000  # maximumPerMinute: the fastest rate a rollout takes
ABORT_RATE = 1_200  # per minute, for the abort row
ABORT_THRESHOLD = 10.0  # percent of executed hubs
ABORT_MIN = 100  # executed hubs before the criterion applies
FAIL_FRACTION = 0.5  # of the abort row's hubs report FAILED
ROLLOUT_BUDGET = 600.0  # seconds the rollout row may take
ABORT_BUDGET = 120.0
REAL_BUDGET = 60.0
POLL = 0.2
ANSWER_WAIT = 60.0  # how long the hubs' answers may trail the database
# cloud up --broker-autosave: changes between saves of Mosquitto's database. The default,
# 1, rewrites the whole database (every hub's session) after every QoS 1 message; at 500
# hubs that made a rollout three times slower and cost Mosquitto 40x the CPU, and at 10,000
# it would not finish in ROLLOUT_BUDGET. A fleet this size runs with a larger value.
AUTOSAVE = 1000


def _progress(what: str) -> None:
    print(f"  rollout: {what} ...", file=sys.stderr, flush=True)


def _recipe(name: str, version: str, run: str) -> dict[str, Any]:
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "Manifests": [{"Platform": {"os": "linux"}, "Lifecycle": {"Run": run}}],
    }


def prepare(fleet: Fleet, folder: Path) -> dict[str, str]:
    """Put every simulated hub in one static group, register the real hub in a group of
    its own (a certificate and key in ``folder``), and publish the components; the real
    hub's credentials."""
    from edgeloop.cloud.context import CloudContext

    ctx = CloudContext.open(fleet.data_dir)
    try:
        ctx.registry.create_group(GROUP)
        ctx.registry.add_many_to_group(GROUP, fleet.things)
        ctx.registry.create_thing(REAL_THING, {"kind": "real"})
        ctx.registry.create_group(REAL_GROUP)
        ctx.registry.add_to_group(REAL_GROUP, REAL_THING)
        issued = ctx.ca.issue_device_certificate(REAL_THING)
        assert issued.private_key_pem is not None
        cert, key = folder / "real.pem", folder / "real.key"
        cert.write_bytes(issued.certificate_pem)
        key.write_bytes(issued.private_key_pem)
        key.chmod(0o600)
        ctx.registry.record_certificates({REAL_THING: issued.certificate_pem})
        for version in ("1.0.0", "2.0.0"):
            ctx.components.publish(
                _recipe(FLEET_COMPONENT, version, "true"), source="rollout bench", artifacts={}
            )
        for version in REAL_VERSIONS:
            ctx.components.publish(
                _recipe(REAL_COMPONENT, version, "sleep 3600"),
                source="rollout bench",
                artifacts={},
            )
        return {"cert": str(cert), "key": str(key), "ca": str(ctx.ca.chain_path)}
    finally:
        ctx.db.dispose()


def _deployment(
    group: str, components: dict[str, str], rate: int, abort: bool = False
) -> dict[str, Any]:
    config: dict[str, Any] = {"jobExecutionsRolloutConfig": {"maximumPerMinute": rate}}
    if abort:
        config["abortConfig"] = {
            "criteriaList": [
                {
                    "failureType": "ALL",
                    "action": "CANCEL",
                    "thresholdPercentage": ABORT_THRESHOLD,
                    "minNumberOfExecutedThings": ABORT_MIN,
                }
            ]
        }
    return {
        "targetArn": f"thinggroup/{group}",
        "deploymentName": f"bench-{group}",
        "components": {name: {"componentVersion": v} for name, v in components.items()},
        "deploymentPolicies": {"healthWindowSeconds": HEALTH_WINDOW},
        "iotJobConfiguration": config,
    }


class Api:
    """The cloud's REST API, as an operator's script uses it."""

    def __init__(self, base: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=base, timeout=60)

    def create(self, body: dict[str, Any]) -> str:
        response = self.client.post("/deployments", json=body)
        if response.status_code != 201:
            raise BenchmarkError(f"create deployment: {response.status_code} {response.text}")
        return str(response.json()["deploymentId"])

    def get(self, deployment_id: str) -> dict[str, Any]:
        response = self.client.get(f"/deployments/{deployment_id}")
        response.raise_for_status()
        document: dict[str, Any] = response.json()
        return document

    def close(self) -> None:
        self.client.close()


# -- row 3: one real hub -----------------------------------------------------------------
def real_hub_row(
    ws: Workspace, api: Api, endpoints: dict[str, Any], creds: dict[str, str]
) -> Result:
    """Create → SUCCEEDED on a real hub agent, REAL_RUNS times, alternating two versions."""
    from edgeloop.edge.control import ControlClient, wait_for_agent

    root = ws.folder() / "hub"
    root.mkdir()
    mq = endpoints["mqtt"]
    settings = {
        "stop_grace": 2.0,
        "cloud": {
            "endpoint": f"{mq['host']}:{mq['port']}",
            **creds,
            "api": endpoints["api"],
            "keepalive": 30,
            "reconnect_max": 1,
        },
    }
    (root / "agent.json").write_text(json.dumps(settings))
    with (root / "agent.stderr").open("ab") as err:
        proc = ws.popen(
            [sys.executable, "-m", "edgeloop.edge.agent", "--root", str(root)],
            stdout=err,
            stderr=err,
        )
    wait_for_agent(root, proc)
    deadline = time.monotonic() + 30
    while True:
        with ControlClient(root, timeout=10) as control:
            if control.call("status")["cloud"]["connected"]:
                break
        if time.monotonic() > deadline:
            raise BenchmarkError("the real hub did not connect to the cloud within 30 s")
        time.sleep(0.1)
    times: list[float] = []
    failures: list[str] = []
    for run in range(REAL_RUNS):
        version = REAL_VERSIONS[run % 2]
        body = _deployment(REAL_GROUP, {REAL_COMPONENT: version}, FASTEST)
        started = time.monotonic()
        deployment_id = api.create(body)
        while True:
            found = api.get(deployment_id)["executions"]
            if found.get("SUCCEEDED"):
                times.append(time.monotonic() - started)
                break
            if any(found.get(s) for s in ("FAILED", "REJECTED", "TIMED_OUT", "CANCELED")):
                failures.append(f"run {run + 1}: {found}")
                break
            if time.monotonic() - started > REAL_BUDGET:
                failures.append(f"run {run + 1}: not done in {REAL_BUDGET:g} s: {found}")
                break
            time.sleep(0.05)
    measured = (
        f"{len(times)}/{REAL_RUNS} SUCCEEDED; create → SUCCEEDED "
        + ", ".join(f"{t:.2f}" for t in times)
        + " s"
        + (f" (median {statistics.median(times):.2f} s)" if times else "")
        + f"; includes the {HEALTH_WINDOW:g} s health window (healthWindowSeconds), REST "
        "create, the job notify, stop of the old version, start of the new, and the "
        "deployment polled every 50 ms"
    )
    if failures:
        measured += "; " + "; ".join(failures)
    return Result(
        benchmark=f"deployment to one real hub agent: create → SUCCEEDED, {REAL_RUNS} runs "
        f"alternating two versions, healthWindowSeconds {HEALTH_WINDOW:g}",
        measured=measured,
        value=statistics.median(times) if times and not failures else float("inf"),
        target=Target(limit=3.0, unit="s"),
        comparison="AWS IoT Greengrass v2: about a minute from CreateDeployment to SUCCEEDED",
    )


# -- rows 1 and 2: the simulated fleet ---------------------------------------------------
def _report(clients: Hubs) -> dict[str, Any]:
    answers = clients.run("report")
    return {
        "done": [d for a in answers for d in a["done"]],
        "notified": sum(n for a in answers for n in a["notified"].values()),
        "requests": sum(a["requests"] for a in answers),
        "rejected": sum(a["rejected"] for a in answers),
        "errors": [e for a in answers for e in a["errors"]],
        "cpu_s": sum(a["cpu_s"] for a in answers),
    }


def rollout_row(
    clients: Hubs, api: Api, server: Any, hubs: int, autosave: int
) -> tuple[Result, str]:
    clients.run("outcome", fail_fraction=0.0, seed=0)
    _report(clients)  # forget what subscribing did
    cpu = (
        _cpu(server.broker_pid),
        _cpu(server.cloud_pid),
        sum(_cpu(pid) for pid in clients.pids),
    )
    started = time.monotonic_ns()
    deployment_id = api.create(_deployment(GROUP, {FLEET_COMPONENT: "1.0.0"}, FASTEST))
    created = (time.monotonic_ns() - started) / 1e9
    seen: float | None = None
    found: dict[str, Any] = {}
    while time.monotonic_ns() - started < ROLLOUT_BUDGET * 1e9:
        found = api.get(deployment_id)
        if found["executions"].get("SUCCEEDED", 0) >= hubs:
            seen = (time.monotonic_ns() - started) / 1e9
            break
        time.sleep(POLL)
    report = _report(clients)
    ours = [d for d in report["done"] if d[0] == deployment_id and d[1] == "SUCCEEDED"]
    drain = time.monotonic() + ANSWER_WAIT
    while seen is not None and len(ours) < hubs and time.monotonic() < drain:
        time.sleep(1.0)  # the answers may trail the database (Mosquitto's queues)
        more = _report(clients)
        report["requests"] += more["requests"]
        report["rejected"] += more["rejected"]
        report["errors"] += more["errors"]
        ours += [d for d in more["done"] if d[0] == deployment_id and d[1] == "SUCCEEDED"]
    ours.sort()
    cloud_cpu = _cpu(server.cloud_pid) - cpu[1]
    broker_cpu = _cpu(server.broker_pid) - cpu[0]
    workers_cpu = sum(_cpu(pid) for pid in clients.pids) - cpu[2]
    accepted = [d[3] for d in ours]
    last = (max(accepted) - started) / 1e9 if accepted else float("nan")
    done_at = seen if seen is not None else float("inf")
    span = (max(accepted) - min(accepted)) / 1e9 if len(accepted) > 1 else float("nan")
    waves = [e for e in found.get("events", []) if e["kind"] == "wave"]
    measured = (
        f"the deployment showed {hubs:,}/{hubs:,} SUCCEEDED {done_at:.1f} s after create "
        f"(REST, polled every {POLL:g} s) = {hubs / done_at:,.0f} executions/s; the hubs heard "
        f"{len(accepted):,} update/accepted, the last {last:.1f} s after create; the REST "
        f"create took {created:.2f} s; {len(waves)} waves; jobs service: "
        f"{len(accepted) / span if span == span and span else 0:,.0f} updates/s between the "
        f"first and last accepted, {report['requests'] / last if accepted else 0:,.0f} "
        f"requests/s in all ({report['requests']:,} start-next + update); CPU s: cloud "
        f"process {cloud_cpu:.1f}, Mosquitto {broker_cpu:.1f}, hub workers {workers_cpu:.1f}"
    )
    if report["rejected"] or report["errors"]:
        measured += f"; {report['rejected']} rejected, first error: {report['errors'][:1]}"
    if seen is None:
        measured += f"; not complete within {ROLLOUT_BUDGET:g} s: {found.get('executions')}"
    return (
        Result(
            benchmark=f"rollout of one version to {hubs:,} simulated hubs, maximumPerMinute "
            f"{FASTEST:,}, no canary, --broker-autosave {autosave}: create → every "
            "execution SUCCEEDED",
            measured=measured,
            value=done_at,
            target=Target(limit=300.0, unit="s"),
        ),
        deployment_id,
    )


def _crossing(db: Any, deployment_id: str) -> tuple[Any, int, int]:
    """When the abort criterion first held, by the executions' timestamps: the time, and
    the executed and failed counts then."""
    from sqlalchemy import select

    from edgeloop.cloud.jobs import JobExecutionRow

    with db.read() as session:
        rows = list(
            session.execute(
                select(JobExecutionRow.status, JobExecutionRow.last_updated_at)
                .where(
                    JobExecutionRow.job_id == deployment_id,
                    JobExecutionRow.status.in_(["SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT"]),
                )
                .order_by(JobExecutionRow.last_updated_at, JobExecutionRow.id)
            )
        )
    failed = 0
    for executed, (status, at) in enumerate(rows, start=1):
        failed += status != "SUCCEEDED"
        if executed >= ABORT_MIN and failed * 100 >= ABORT_THRESHOLD * executed:
            return at, executed, failed
    raise BenchmarkError(f"the abort criterion never held over {len(rows)} executions")


def abort_row(clients: Hubs, api: Api, db: Any, hubs: int) -> Result:
    from datetime import UTC, datetime

    clients.run("outcome", fail_fraction=FAIL_FRACTION, seed=1)
    _report(clients)
    deployment_id = api.create(
        _deployment(GROUP, {FLEET_COMPONENT: "2.0.0"}, ABORT_RATE, abort=True)
    )
    started = time.monotonic()
    found: dict[str, Any] = {}
    while time.monotonic() - started < ABORT_BUDGET:
        found = api.get(deployment_id)
        if found["status"] == "ABORTED":
            break
        time.sleep(POLL)
    else:
        raise BenchmarkError(f"the deployment did not abort within {ABORT_BUDGET:g} s: {found}")
    time.sleep(5.0)  # executions in flight end, the rollback reaches the hubs that took it
    found = api.get(deployment_id)
    aborted = next(e for e in found["events"] if e["kind"] == "aborted")
    aborted_at = datetime.fromisoformat(aborted["at"])
    crossed_at, executed, failed = _crossing(db, deployment_id)
    if crossed_at.tzinfo is None:
        crossed_at = crossed_at.replace(tzinfo=UTC)
    if aborted_at.tzinfo is None:
        aborted_at = aborted_at.replace(tzinfo=UTC)
    delay = (aborted_at - crossed_at).total_seconds()
    counts = found["executions"]
    notified = sum(counts.values())
    at_abort = aborted["detail"].get("executions", {})
    rollback = found.get("rollback") or {}
    report = _report(clients)
    return Result(
        benchmark=f"abort: {FAIL_FRACTION:.0%} of hubs report FAILED, abortConfig ALL "
        f"{ABORT_THRESHOLD:g}% after {ABORT_MIN} executed, maximumPerMinute {ABORT_RATE:,}: "
        "criterion met → deployment aborted",
        measured=f"{delay:.2f} s from the update that met the criterion ({failed} of "
        f"{executed} executed failed; executions' lastUpdatedAt) to the 'aborted' event; "
        f"at the abort {at_abort.get('succeeded', 0) + at_abort.get('failed', 0)} had "
        f"executed; {notified:,} of {hubs:,} hubs were ever notified ({found['released']:,} "
        f"released), executions now {counts}: the queued ones CANCELED and the other "
        f"{hubs - found['released']:,} never notified; rollback job to the previous "
        f"deployment on the {found.get('rollback') and sum(rollback.values())} hubs that "
        f"took it: {rollback}; {report['rejected']} requests rejected",
        value=delay,
        target=Target(limit=30.0, unit="s"),
    )


# -- the suite ---------------------------------------------------------------------------
def run(
    out: SuiteResult, *, hubs: int = HUBS, workers: int = WORKERS, autosave: int = AUTOSAVE
) -> None:
    """Run the rollout benchmarks, adding rows to ``out`` as they complete."""
    from edgeloop.cloud.db import Database
    from edgeloop.cloud.service import read_endpoints

    if hubs < workers:
        raise BenchmarkError(f"--hubs must be at least {workers}")
    limits = raise_fd_limit(hubs)
    with Workspace() as ws:
        _progress(f"registering {hubs:,} things and issuing their certificates")
        fleet = make_fleet(ws, hubs)
        started = time.perf_counter()
        creds = prepare(fleet, fleet.data_dir.parent)
        out.notes.append(
            fleet.setup + f" Then all {hubs:,} put in one static group with one "
            f"add_many_to_group call, and the components published "
            f"({time.perf_counter() - started:.1f} s)."
        )
        server, proc = start_cloud(ws, fleet, autosave=autosave)
        api = Api(server.api)
        db = Database.in_data_dir(fleet.data_dir)
        try:
            endpoints = read_endpoints(fleet.data_dir)
            _progress("one real hub: create → SUCCEEDED")
            out.results.append(real_hub_row(ws, api, endpoints, creds))
            with Hubs(fleet, server.port, workers=workers, main=_jobhubs.serve) as clients:
                _progress(f"connecting {hubs:,} simulated hubs")
                answers = clients.run("connect", budget=STORM_BUDGET)
                connected = sum(a["connected"] for a in answers)
                if connected < hubs:
                    errors = [e for a in answers for e in a["errors"]]
                    raise BenchmarkError(
                        f"only {connected:,}/{hubs:,} hubs connected: {errors[:3]}"
                    )
                answers = clients.run("subscribe-jobs", budget=STORM_BUDGET)
                if any(a["failed"] or a["late"] for a in answers):
                    raise BenchmarkError(f"subscribing failed: {answers[0]['errors'][:3]}")
                time.sleep(2.0)  # the first start-next's answers ("nothing queued")
                _progress(f"rollout to {hubs:,} hubs at {FASTEST:,}/min")
                row, _ = rollout_row(clients, api, server, hubs, autosave)
                out.results.append(row)
                _progress("abort")
                out.results.append(abort_row(clients, api, db, hubs))
                clients.run("disconnect")
        finally:
            api.close()
            db.dispose()
            stop_cloud(proc, fleet)
    out.notes += [
        f"Simulated hubs: {hubs:,} (benchmarks/_jobhubs.py over benchmarks/_hubs.py) in "
        f"{workers} worker processes, MQTT 5 over mutual TLS, each with its own certificate; "
        "the device side of AWS IoT Jobs: notify-next → start-next → jobs/{jobId}/update "
        "(SUCCEEDED or FAILED, expectedVersion) → start-next until none is left, "
        f"{CONCURRENCY} subscribes in flight per worker. They run no components: the rows "
        "measure the cloud's rollout, jobs service and broker.",
        "Deployments are created and followed over REST (POST/GET /api/v1/deployments); "
        "the cloud ticks rollouts once a second, so a wave (rate/60 hubs at most) leaves "
        "at most once a second and an abort is decided at the next tick.",
        f"Abort: the moment the criterion held is taken from the job executions' "
        f"lastUpdatedAt in the cloud's database (the update after which ≥ {ABORT_MIN} had "
        f"executed and ≥ {ABORT_THRESHOLD:g}% of them failed); the abort from the "
        "deployment's 'aborted' event; both on the cloud's clock.",
        f"Real hub: `python -m edgeloop.edge.agent --root …` with agent.json naming the "
        f"cloud (MQTT endpoint, certificate, API); a component whose Run is `sleep 3600`, no "
        f"artifacts; each deployment replaces the previous one's version. {limits}.",
        f"The cloud runs with --broker-autosave {autosave} (Mosquitto saves its database "
        f"after every {autosave} change(s); 1 is cloud up's default).",
    ]


__all__ = ["run"]
