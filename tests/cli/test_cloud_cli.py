"""`edgeloop cloud …` as a user runs it: the console script against a real running cloud."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cloud.test_cloud_up import RunningCloud
from tests.edge.conftest import pid_alive

EDGELOOP = Path(sys.executable).parent / "edgeloop"
CERT_ID = re.compile(r"[0-9a-f]{64}")
Result = subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    running = RunningCloud(tmp_path_factory.mktemp("cloud") / "data")
    yield running
    running.close()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("EDGELOOP_CLOUD", "EDGELOOP_CLOUD_DATA", "FORCE_COLOR", "TTY_COMPATIBLE"):
        env.pop(key, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "300"  # rich wraps at 80 columns when it is not on a terminal
    env.update(extra)
    return env


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run the console script as given."""
    return subprocess.run(
        [str(EDGELOOP), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or _env(),
        check=False,
    )


def cli(cloud: RunningCloud, *args: str | Path) -> Result:
    """``edgeloop cloud ARGS --url <the test cloud>``."""
    return run("cloud", *args, "--url", cloud.endpoints["api"])


def together(cloud: RunningCloud, *commands: tuple[str | Path, ...]) -> list[Result]:
    """Independent commands run at once: each one is mostly the console script starting."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: cli(cloud, *args), commands))


def ok(result: Result) -> str:
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def json_out(result: Result) -> Any:
    return json.loads(ok(result))


def one_error_line(result: Result) -> str:
    """The single ``error: …`` line a failing command prints, checked for shape."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _name(kind: str = "hub") -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


# -- things --------------------------------------------------------------------------------


def test_thing_create_list_show_and_delete(cloud: RunningCloud) -> None:
    thing = _name()
    created, typed = together(
        cloud,
        ("thing", "create", thing, "--attr", "model=pi4", "--attr", "floor=3"),
        ("thing", "create", f"{thing}-b", "--type", "hub", "--json"),
    )
    assert ok(created) == f"created thing {thing}\n"
    assert json_out(typed)["thingType"] == "hub" and json_out(typed)["version"] == 1

    listed, table, shown, detail = together(
        cloud,
        ("thing", "list", "--prefix", thing, "--json"),
        ("thing", "list", "--prefix", thing),
        ("thing", "show", thing),
        ("thing", "show", thing, "--json"),
    )
    things = json_out(listed)
    assert [t["thingName"] for t in things] == [thing, f"{thing}-b"]
    assert things[0]["attributes"] == {"model": "pi4", "floor": "3"}  # strings, as in AWS
    assert "2 things" in ok(table)
    assert re.search(rf"│ {thing} +│ +│ floor=3, model=pi4 +│ 1 ", table.stdout), table.stdout
    assert f"thing {thing}\n" in ok(shown)
    for line in (
        "attributes: floor=3, model=pi4",
        "groups: none",
        "connectivity: offline, never connected",
        "certificates: none",
    ):
        assert f"\n{line}\n" in shown.stdout
    assert json_out(detail)["connectivity"]["connected"] is False
    assert json_out(detail)["groups"] == []

    deleted, gone = together(
        cloud, ("thing", "delete", thing), ("thing", "delete", f"{thing}-b", "--json")
    )
    assert ok(deleted) == f"deleted thing {thing}\n"
    assert json_out(gone) == {"thingName": f"{thing}-b", "deleted": True}
    assert json_out(cli(cloud, "thing", "list", "--prefix", thing, "--json")) == []


def test_thing_errors_are_one_line(cloud: RunningCloud) -> None:
    missing, thing = _name(), _name()
    show, delete, attr, bad_name, created = together(
        cloud,
        ("thing", "show", missing),
        ("thing", "delete", missing),
        ("thing", "create", _name(), "--attr", "model"),
        ("thing", "create", "bad name!"),
        ("thing", "create", thing),
    )
    assert one_error_line(show) == f"error: no thing named '{missing}'"
    assert one_error_line(delete) == f"error: no thing named '{missing}'"
    assert one_error_line(attr) == "error: --attr: 'model' is not KEY=VALUE"
    assert one_error_line(bad_name).startswith("error: thingName: 'bad name!' must be")
    ok(created)
    assert one_error_line(cli(cloud, "thing", "create", thing)) == (
        f"error: a thing named '{thing}' already exists"
    )


# -- groups --------------------------------------------------------------------------------


def test_static_and_dynamic_groups(cloud: RunningCloud) -> None:
    model = uuid.uuid4().hex[:8]
    thing, static, dynamic = _name(), _name("kitchen"), _name("pis")
    query = f"attributes.model:{model}"
    for result in together(
        cloud, ("thing", "create", thing, "--attr", f"model={model}"), ("group", "create", static)
    ):
        ok(result)

    assert ok(cli(cloud, "group", "add", static, thing)) == f"added {thing} to {static}\n"
    again, again_json, created = together(
        cloud,
        ("group", "add", static, thing),
        ("group", "add", static, thing, "--json"),
        ("group", "create", dynamic, "--query", query),
    )
    assert ok(again) == f"{thing} was already in {static}\n"
    assert json_out(again_json) == {
        "thingGroupName": static,
        "thingName": thing,
        "member": True,
        "changed": False,
    }
    assert ok(created) == f"created dynamic group {dynamic} ({query}): 1 member\n"

    to_dynamic, to_missing, bad_query, listed, table, shown = together(
        cloud,
        ("group", "add", dynamic, thing),
        ("group", "add", f"{static}x", thing),
        ("group", "create", _name("g"), "--query", "attributes.model:"),
        ("group", "list", "--json"),
        ("group", "list"),
        ("thing", "show", thing, "--json"),
    )
    assert one_error_line(to_dynamic).startswith(f"error: thing group '{dynamic}' is dynamic")
    assert one_error_line(to_missing) == f"error: no thing group named '{static}x'"
    assert one_error_line(bad_query).startswith(
        "error: --query: attributes.model:: position 17:"
    ), bad_query.stderr
    groups = {g["thingGroupName"]: g for g in json_out(listed)}
    assert groups[static]["kind"] == "static" and groups[dynamic]["query"] == query
    assert re.search(rf"│ {dynamic} +│ dynamic │ {re.escape(query)} ", ok(table)), table.stdout
    assert sorted(json_out(shown)["groups"]) == sorted([static, dynamic])


# -- certificates and claims ---------------------------------------------------------------


def test_cert_issue_writes_the_identity_and_revoke_ends_it(
    cloud: RunningCloud, tmp_path: Path
) -> None:
    thing = _name()
    ok(cli(cloud, "thing", "create", thing))
    out = tmp_path / "certs"
    lines = ok(cli(cloud, "cert", "issue", thing, "--out", out)).splitlines()
    assert lines[0].startswith("certificate ") and CERT_ID.fullmatch(lines[0].split()[1])
    cert_id = lines[0].split()[1]
    cert, key, root = out / f"{thing}.cert.pem", out / f"{thing}.key.pem", out / "root-ca.pem"
    assert {f"  wrote {p}" for p in (cert, key, root)} == set(lines[1:])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert root.read_bytes() == (Path(cloud.endpoints["dataDir"]) / "ca" / "root.pem").read_bytes()
    issued = x509.load_pem_x509_certificate(cert.read_bytes())
    assert issued.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == thing
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert private.public_key().public_numbers() == issued.public_key().public_numbers()  # type: ignore[union-attr]

    # A second issue into the same folder would overwrite the key: refused before issuing.
    refused = one_error_line(cli(cloud, "cert", "issue", thing, "--out", out))
    assert refused == f"error: --out: {cert} exists; move it away or choose another --out"
    shown = ok(cli(cloud, "thing", "show", thing))
    assert re.search(rf"│ {cert_id} │ device │ ACTIVE ", shown), shown
    assert shown.count("│ device │") == 1

    revoked = ok(cli(cloud, "cert", "revoke", cert_id, "--reason", "stolen"))
    assert revoked == f"revoked certificate {cert_id} of {thing} (stolen)\n"
    again, detail, unknown_cert, unknown_thing = together(
        cloud,
        ("cert", "revoke", cert_id),
        ("thing", "show", thing, "--json"),
        ("cert", "revoke", "nope"),
        ("cert", "issue", f"{thing}x", "--out", tmp_path / "other"),
    )
    assert cert_id in one_error_line(again) and "revoked" in again.stderr
    assert json_out(detail)["certificates"][0]["status"] == "REVOKED"
    assert one_error_line(unknown_cert) == "error: no certificate named 'nope'"
    assert one_error_line(unknown_thing) == f"error: no thing named '{thing}x'"


def test_cert_issue_for_a_csr_keeps_the_key_local(cloud: RunningCloud, tmp_path: Path) -> None:
    thing = _name()
    ok(cli(cloud, "thing", "create", thing))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)]))
        .sign(key, hashes.SHA256())
    )
    csr_file = tmp_path / "hub.csr"
    csr_file.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    result = json_out(
        cli(cloud, "cert", "issue", thing, "--csr", csr_file, "--out", tmp_path, "--json")
    )
    assert "privateKeyPem" not in result
    assert set(result["files"]) == {"cert", "rootCa"}
    assert not (tmp_path / f"{thing}.key.pem").exists()
    issued = x509.load_pem_x509_certificate((tmp_path / f"{thing}.cert.pem").read_bytes())
    assert issued.public_key() == key.public_key()
    assert CERT_ID.fullmatch(result["certificateId"]) and result["status"] == "ACTIVE"

    csr_file.write_text("not a CSR")
    bad = one_error_line(
        cli(cloud, "cert", "issue", thing, "--csr", csr_file, "--out", tmp_path / "2")
    )
    assert bad.startswith("error: --csr: ")


def test_claim_create(cloud: RunningCloud, tmp_path: Path) -> None:
    template = _name("factory")
    out = ok(cli(cloud, "claim", "create", template, "--out", tmp_path))
    assert out.splitlines()[0].startswith("claim certificate ")
    assert out.splitlines()[-1] == f"created provisioning template {template}"
    key = tmp_path / f"claim-{template}.key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / f"claim-{template}.cert.pem").exists()
    assert (tmp_path / "root-ca.pem").exists()

    again = json_out(cli(cloud, "claim", "create", template, "--out", tmp_path / "2", "--json"))
    assert again["template"] == template and again["templateCreated"] is False
    assert again["kind"] == "claim" and "privateKeyPem" not in again
    assert "template: 'no way!' must be" in one_error_line(
        cli(cloud, "claim", "create", "no way!", "--out", tmp_path / "3")
    )


# -- fleet queries -------------------------------------------------------------------------


def test_fleet_query(cloud: RunningCloud) -> None:
    model = uuid.uuid4().hex[:8]
    things = sorted(_name() for _ in range(3))
    creates = [
        ("thing", "create", thing, "--attr", f"model={model}", "--attr", f"f={floor}")
        for floor, thing in enumerate(things)
    ]
    for result in together(cloud, *creates):
        ok(result)
    some, every, none, bad = together(
        cloud,
        ("fleet", "query", f"attributes.model:{model} AND attributes.f>0"),
        ("fleet", "query", f"attributes.model:{model}", "--json"),
        ("fleet", "query", "attributes.model:nothing-has-this"),
        ("fleet", "query", "attributes.model:pi4 AND ("),
    )
    assert ok(some) == f"{things[1]}\n{things[2]}\n2 things match\n"
    assert json_out(every) == {"things": things, "count": 3}
    assert ok(none) == "0 things match\n"
    assert one_error_line(bad) == (
        'error: query: attributes.model:pi4 AND (: position 26: expected a term after "(", '
        "found the end of the query"
    )


# -- shadows -------------------------------------------------------------------------------


def test_shadow_get_and_update(cloud: RunningCloud, tmp_path: Path) -> None:
    thing = _name()
    ok(cli(cloud, "thing", "create", thing))
    missing, named, bad_json, not_object, neither = together(
        cloud,
        ("shadow", "get", thing),
        ("shadow", "update", thing, "--name", "config", "--desired", '{"rate": 5}', "--json"),
        ("shadow", "update", thing, "--desired", "{bad"),
        ("shadow", "update", thing, "--reported", "[1]"),
        ("shadow", "update", thing),
    )
    assert one_error_line(missing) == (
        f"error: classic shadow of thing '{thing}': No shadow exists with name: {thing} (404)"
    )
    assert json_out(named)["version"] == 1
    assert one_error_line(bad_json).startswith("error: --desired: not valid JSON")
    assert one_error_line(not_object) == (
        "error: --reported: must be a JSON object, or null to clear it"
    )
    assert one_error_line(neither) == "error: --desired: give --desired or --reported (or both)"

    assert ok(cli(cloud, "shadow", "update", thing, "--desired", '{"temp": 19}')) == (
        f"classic shadow of thing '{thing}' is at version 1\n"
    )
    reported = tmp_path / "reported.json"
    reported.write_text('{"temp": 21.5}')
    accepted = json_out(
        cli(cloud, "shadow", "update", thing, "--reported", f"@{reported}", "--json")
    )
    assert accepted["state"] == {"reported": {"temp": 21.5}} and accepted["version"] == 2

    as_json, human, named_doc = together(
        cloud,
        ("shadow", "get", thing, "--json"),
        ("shadow", "get", thing),
        ("shadow", "get", thing, "--name", "config", "--json"),
    )
    state = {"desired": {"temp": 19}, "reported": {"temp": 21.5}, "delta": {"temp": 19}}
    assert json_out(as_json)["state"] == state
    assert ok(human).startswith(f"classic shadow of thing '{thing}', version 2, updated ")
    assert json.loads(human.stdout.split("\n", 1)[1]) == state
    assert json_out(named_doc)["state"] == {"desired": {"rate": 5}, "delta": {"rate": 5}}


# -- finding the cloud ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_cloud_answering(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    assert one_error_line(run("cloud", "thing", "list", "--url", url)) == (
        f"error: no cloud is answering at {url} (start one with: edgeloop cloud up)"
    )
    # From the environment too, and with no URL at all and no local install.
    assert url in one_error_line(run("cloud", "fleet", "query", "*", env=_env(EDGELOOP_CLOUD=url)))
    empty = tmp_path / "nothing-here"
    none = one_error_line(run("cloud", "thing", "list", env=_env(EDGELOOP_CLOUD_DATA=str(empty))))
    assert none == (
        "error: no cloud to talk to: pass --url or set $EDGELOOP_CLOUD, or start one in "
        f"{empty} with: edgeloop cloud up"
    )


def test_url_from_the_environment(cloud: RunningCloud) -> None:
    thing = _name()
    env = _env(EDGELOOP_CLOUD=cloud.endpoints["api"] + "/api/v1/")  # the API's prefix is fine
    assert ok(run("cloud", "thing", "create", thing, env=env)) == f"created thing {thing}\n"


# -- cloud up ------------------------------------------------------------------------------


def test_cloud_up_serves_until_interrupted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    env = _env(EDGELOOP_CLOUD_DATA=str(data))
    proc = subprocess.Popen(
        [str(EDGELOOP), "cloud", "up", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None

    def read() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        printed: list[str] = []
        deadline = time.monotonic() + 30
        while not any(line.startswith("Ctrl-C") for line in printed):
            assert proc.poll() is None, (printed, proc.stderr.read() if proc.stderr else "")
            assert time.monotonic() < deadline, printed
            try:
                printed.append(lines.get(timeout=0.2).rstrip("\n"))
            except queue.Empty:
                pass
        endpoints = json.loads((data / "endpoints.json").read_text())
        mqtt = endpoints["mqtt"]
        assert printed == [
            f"edgeloop cloud is up, data in {data}",
            f"  API          http://127.0.0.1:{port}/api/v1",
            f"  API docs     http://127.0.0.1:{port}/docs",
            f"  MQTT (mTLS)  {mqtt['host']}:{mqtt['port']}",
            f"  CA file      {endpoints['caFile']}",
            "Ctrl-C stops it.",
        ]
        broker_pid = int((data / "broker" / "mosquitto.pid").read_text())
        assert pid_alive(broker_pid)

        # No --url: the client finds the local install through its endpoints file.
        thing = _name()
        assert ok(run("cloud", "thing", "create", thing, env=env)) == f"created thing {thing}\n"
        second = one_error_line(run("cloud", "up", "--port", str(_free_port()), env=env))
        assert second == (
            f"error: a cloud is already running on {data} (its API: "
            f"http://127.0.0.1:{port}/api/v1); stop it first, or choose another --data-dir"
        )
        taken = run("cloud", "up", "--data-dir", tmp_path / "other", "--port", str(port), env=env)
        assert one_error_line(taken) == (
            f"error: 127.0.0.1:{port} is in use (another cloud?); choose another --port"
        )

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert not pid_alive(broker_pid)
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
