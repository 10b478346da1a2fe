"""`edgeloop cloud …`: run a cloud, and manage its fleet through the REST API.

Every command but ``up`` is a thin client of the API under ``/api/v1`` (each has a REST
twin there). The cloud is found by ``--url``, else ``$EDGELOOP_CLOUD``, else the
endpoints file of the local install. ``up`` alone imports the server (FastAPI,
SQLAlchemy, cryptography), and only when it runs, so the client commands start fast.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from edgeloop.cli._common import JsonOption, console, one_line_errors, print_json
from edgeloop.core.errors import CloudError, ValidationError

if TYPE_CHECKING:
    import httpx

# Read here rather than through edgeloop.cloud.service: importing that module pulls in
# SQLAlchemy and cryptography (~0.7 s) for commands that only speak HTTP.
ENDPOINTS_FILE = "endpoints.json"
API_PATH = "/api/v1"
TIMEOUT = 30.0
PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def default_cloud_data() -> Path:
    """``$EDGELOOP_CLOUD_DATA``, else a per-user folder."""
    env = os.environ.get("EDGELOOP_CLOUD_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgeloop" / "cloud"


DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        help="The install's folder (default: $EDGELOOP_CLOUD_DATA, else a per-user folder).",
        default_factory=default_cloud_data,
        show_default=False,
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="EDGELOOP_CLOUD",
        help="The cloud's API (default: $EDGELOOP_CLOUD, else the local install's).",
        show_default=False,
    ),
]

app = typer.Typer(help="Run the cloud and manage its fleet.", no_args_is_help=True)
thing_app = typer.Typer(help="Register, list, show and delete things.", no_args_is_help=True)
group_app = typer.Typer(help="Static and dynamic thing groups.", no_args_is_help=True)
cert_app = typer.Typer(help="Issue and revoke device certificates.", no_args_is_help=True)
claim_app = typer.Typer(help="Claim certificates for provisioning.", no_args_is_help=True)
fleet_app = typer.Typer(help="Query the fleet.", no_args_is_help=True)
shadow_app = typer.Typer(help="Read and update device shadows.", no_args_is_help=True)
component_app = typer.Typer(
    help="Publish, list, show and delete components in the registry.", no_args_is_help=True
)
app.add_typer(thing_app, name="thing")
app.add_typer(group_app, name="group")
app.add_typer(cert_app, name="cert")
app.add_typer(claim_app, name="claim")
app.add_typer(fleet_app, name="fleet")
app.add_typer(shadow_app, name="shadow")
app.add_typer(component_app, name="component")


# == the REST client ======================================================================


@dataclass(frozen=True)
class CloudAccess:
    """Where the API is and how to be let in: its CA (for HTTPS) and the operator token."""

    url: str  # without /api/v1
    ca_file: str | None = None
    token: str | None = None


def _local_install() -> tuple[Path, dict[str, Any] | None]:
    data_dir = default_cloud_data()
    try:
        endpoints = json.loads((data_dir / ENDPOINTS_FILE).read_text())
    except FileNotFoundError:
        return data_dir, None
    except (OSError, ValueError) as err:
        raise CloudError(f"{data_dir / ENDPOINTS_FILE}: unreadable ({err})") from err
    if not isinstance(endpoints, dict) or not isinstance(endpoints.get("api"), str):
        raise CloudError(f"{data_dir / ENDPOINTS_FILE}: no 'api' address in it")
    return data_dir, endpoints


def _normalized(url: str) -> str:
    if "://" not in url:
        url = f"http://{url}"
    return url.rstrip("/").removesuffix(API_PATH)


def resolve_access(url: str | None) -> CloudAccess:
    """The API to call: ``url`` (the option or $EDGELOOP_CLOUD), else the local install's.

    The CA file and the operator token come from $EDGELOOP_CA_FILE and $EDGELOOP_TOKEN,
    else from the local install when it is the cloud being called.
    """
    data_dir, local = _local_install()
    if not url and local is None:
        raise CloudError(
            f"no cloud to talk to: pass --url or set $EDGELOOP_CLOUD, or start one in "
            f"{data_dir} with: edgeloop cloud up"
        )
    resolved = _normalized(url or str(local["api"] if local else ""))
    ca_file = os.environ.get("EDGELOOP_CA_FILE") or None
    token = os.environ.get("EDGELOOP_TOKEN") or None
    if local is not None and _normalized(str(local["api"])) == resolved:
        ca_file = ca_file or local.get("caFile")
        if token is None and local.get("tokenFile"):
            try:
                token = Path(local["tokenFile"]).read_text().strip() or None
            except OSError:
                token = None  # a cloud without --tls does not ask for it
    return CloudAccess(resolved, ca_file, token)


def resolve_url(url: str | None) -> str:
    """The API's base URL (without /api/v1): the option or env, else the local install's."""
    return resolve_access(url).url


class CloudClient:
    """A small client of the cloud's REST API; every failure becomes one CloudError line."""

    def __init__(self, url: str | None) -> None:
        import httpx  # here, not at the top: every other edgeloop command would pay for it

        access = resolve_access(url)
        self.url = access.url
        verify: Any = True
        if access.ca_file:
            import ssl

            try:
                verify = ssl.create_default_context(cafile=access.ca_file)
            except (OSError, ssl.SSLError) as err:
                raise CloudError(f"the CA file {access.ca_file} is unusable: {err}") from err
        headers = {"Authorization": f"Bearer {access.token}"} if access.token else {}
        self._http = httpx.Client(
            base_url=self.url + API_PATH, timeout=TIMEOUT, verify=verify, headers=headers
        )

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        what: str = "",
        fields: dict[str, str] | None = None,
        content: Any = None,
        missing_ok: bool = False,
    ) -> Any:
        """The JSON answer of one request (None for 204, and for 404 when ``missing_ok``).

        ``what`` names the resource in shadow errors (whose documents do not);
        ``fields`` renames the API's field names to the command's option names;
        ``content`` is a raw body (bytes, a file, an iterator of bytes) instead of JSON.
        """
        import httpx

        try:
            response = self._http.request(
                method, path, json=json_body, params=params, content=content
            )
        except httpx.ConnectError as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                raise CloudError(
                    f"the certificate of the cloud at {self.url} is not trusted: set "
                    "$EDGELOOP_CA_FILE to its CA file (caFile in its endpoints.json)"
                ) from None
            raise CloudError(
                f"no cloud is answering at {self.url} (start one with: edgeloop cloud up)"
            ) from None
        except httpx.TimeoutException:
            raise CloudError(f"the cloud at {self.url} did not answer in {TIMEOUT:.0f} s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise CloudError(f"cannot reach a cloud at {self.url}: {err}") from err
        if response.status_code == 204 or (missing_ok and response.status_code == 404):
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        raise CloudError(self._error_line(response, body, what, fields or {}))

    def _error_line(
        self, response: httpx.Response, body: Any, what: str, fields: dict[str, str]
    ) -> str:
        status = response.status_code
        if not isinstance(body, dict) or not isinstance(body.get("message"), str):
            first = (response.text.strip().splitlines() or [response.reason_phrase])[0]
            return f"the cloud at {self.url} answered {status}: {first[:200]}"
        message: str = body["message"]
        if "code" in body and "error" not in body:  # AWS's shadow error document
            return f"{what}: {message} ({status})" if what else f"{message} ({status})"
        field = body.get("field")
        if isinstance(field, str) and field:
            if message.startswith(f"{field}: "):
                message = message[len(field) + 2 :]
            message = f"{fields.get(field, field)}: {message}"
        if status >= 500:
            return f"the cloud at {self.url} is unavailable: {message}"
        return message


# == cloud up =============================================================================


@app.command()
@one_line_errors
def up(
    data_dir: DataDirOption,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="The API's port; the broker's are above it.")
    ] = 8440,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    db: Annotated[
        str | None,
        typer.Option("--db", help="A database URL (default: SQLite in the data folder)."),
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(help="An S3 endpoint for objects (default: files in the data folder)."),
    ] = None,
    broker_autosave: Annotated[
        int,
        typer.Option(
            min=1,
            help="Changes between saves of the broker's database (1: after every change, "
            "so a kill -9 loses nothing saved; more: faster for large fleets).",
        ),
    ] = 1,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Serve the API over HTTPS: things call it with their certificates, "
            "operators with the token in the data folder's api-token. Needed beyond loopback.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Run the cloud in the foreground: API, database, object store, broker, services.

    Prints the endpoints once everything answers; Ctrl-C stops it all.
    """
    data_dir = data_dir.expanduser().resolve()
    _refuse_if_running(data_dir)
    _refuse_if_taken(host, port)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from edgeloop.cloud.service import Cloud, CloudSettings

    def ready(endpoints: dict[str, Any]) -> None:
        if as_json:
            print_json(endpoints)
        else:
            api, mqtt = endpoints["api"], endpoints["mqtt"]
            console.print(f"[bold]edgeloop cloud[/bold] is up, data in {data_dir}", highlight=False)
            console.print(f"  API          {api}{API_PATH}", highlight=False)
            console.print(f"  API docs     {api}/docs", highlight=False)
            console.print(f"  MQTT (mTLS)  {mqtt['host']}:{mqtt['port']}", highlight=False)
            console.print(f"  CA file      {endpoints['caFile']}", highlight=False)
            if api.startswith("https:"):
                console.print(f"  API token    {endpoints['tokenFile']}", highlight=False)
            console.print("Ctrl-C stops it.")
        console.file.flush()

    settings = CloudSettings(
        data_dir=data_dir,
        host=host,
        port=port,
        db_url=db,
        s3_endpoint=s3_endpoint,
        tls=tls,
        broker_autosave=broker_autosave,
    )
    try:
        asyncio.run(Cloud(settings).serve_forever(ready))
    except KeyboardInterrupt:  # before serve_forever took over SIGINT
        raise typer.Exit(130) from None
    if not as_json:
        console.print("edgeloop cloud stopped")


def _refuse_if_running(data_dir: Path) -> None:
    """CloudError when a cloud already runs on ``data_dir``.

    Its broker holds ``broker/broker.lock`` for as long as it runs, so the lock, not the
    API's health, is the answer: a recorded API address may since belong to anything.
    """
    lock = data_dir / "broker" / "broker.lock"
    try:
        with lock.open("rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return
    except BlockingIOError:
        api = _recorded_api(data_dir)
        raise CloudError(
            f"a cloud is already running on {data_dir}"
            + (f" (its API: {api}{API_PATH})" if api else "")
            + "; stop it first, or choose another --data-dir"
        ) from None


def _refuse_if_taken(host: str, port: int) -> None:
    """CloudError when the API's port is taken.

    Checked here because uvicorn, failing to bind, logs and calls sys.exit from inside the
    event loop, after the broker has started: no clear line, and a broker left behind.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise CloudError(
                f"{host}:{port} is in use (another cloud?); choose another --port"
            ) from None
        # create_server's message repeats the address; the plain reason reads better.
        reason = (err.strerror or str(err)).split(" (while attempting", 1)[0]
        raise CloudError(f"cannot listen on {host}:{port}: {reason}; check --host") from None


def _recorded_api(data_dir: Path) -> str | None:
    try:
        api = json.loads((data_dir / ENDPOINTS_FILE).read_text()).get("api")
    except (OSError, ValueError, AttributeError):
        return None
    return api if isinstance(api, str) else None


# == things ===============================================================================


@thing_app.command("create")
@one_line_errors
def thing_create(
    name: str,
    attr: Annotated[
        list[str] | None, typer.Option("--attr", help="An attribute KEY=VALUE (repeatable).")
    ] = None,
    thing_type: Annotated[str | None, typer.Option("--type", help="The thing type.")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a thing."""
    body: dict[str, Any] = {"thingName": name, "attributes": parse_attributes(attr or [])}
    if thing_type is not None:
        body["thingType"] = thing_type
    with CloudClient(url) as api:
        thing = api.call(
            "POST",
            "/things",
            json_body=body,
            fields={"thingType": "--type", "attributes": "--attr"},
        )
    if as_json:
        print_json(thing)
        return
    console.print(f"created thing {escape(thing['thingName'])}", highlight=False)


def parse_attributes(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` options as a map; values stay strings, as AWS IoT's attributes do."""
    attributes: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValidationError(f"{item!r} is not KEY=VALUE", field="--attr")
        attributes[key.strip()] = value
    return attributes


@thing_app.command("list")
@one_line_errors
def thing_list(
    prefix: Annotated[str, typer.Option(help="Only names starting with this.")] = "",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List things in name order."""
    things: list[dict[str, Any]] = []
    with CloudClient(url) as api:
        token: str | None = None
        while True:
            params = {"prefix": prefix, "pageSize": "250"}
            if token:
                params["nextToken"] = token
            page = api.call("GET", "/things", params=params)
            things += page["things"]
            token = page["nextToken"]
            if not token:
                break
    if as_json:
        print_json(things)
        return
    table = Table(title=f"{len(things)} thing{'s' if len(things) != 1 else ''}")
    for column in ("name", "type", "attributes", "version", "created"):
        table.add_column(column, overflow="fold")
    for thing in things:
        table.add_row(
            escape(thing["thingName"]),
            escape(thing["thingType"] or ""),
            escape(_attributes(thing["attributes"])),
            str(thing["version"]),
            _when(thing["createdAt"]),
        )
    console.print(table)


@thing_app.command("show")
@one_line_errors
def thing_show(name: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Show a thing: attributes, groups, connectivity and certificates."""
    with CloudClient(url) as api:
        thing = api.call("GET", f"/things/{_q(name)}")
    if as_json:
        print_json(thing)
        return
    kind = f" ({escape(thing['thingType'])})" if thing["thingType"] else ""
    console.print(f"[bold]thing[/bold] {escape(thing['thingName'])}{kind}", highlight=False)
    console.print(
        f"version {thing['version']}, created {_when(thing['createdAt'])}, "
        f"updated {_when(thing['updatedAt'])}",
        highlight=False,
    )
    console.print(f"attributes: {escape(_attributes(thing['attributes'])) or 'none'}")
    console.print(f"groups: {escape(', '.join(thing['groups'])) or 'none'}", highlight=False)
    console.print(f"connectivity: {_connectivity(thing['connectivity'])}", highlight=False)
    certificates = thing["certificates"]
    if not certificates:
        console.print("certificates: none")
        return
    table = Table(title="certificates")
    for column in ("id", "kind", "status", "created", "revoked"):
        table.add_column(column, overflow="fold")
    for cert in certificates:
        style = {"ACTIVE": "green", "REVOKED": "red"}.get(cert["status"], "yellow")
        table.add_row(
            cert["certificateId"],
            cert["kind"],
            f"[{style}]{cert['status']}[/{style}]",
            _when(cert["createdAt"]),
            _when(cert["revokedAt"]),
        )
    console.print(table)


def _connectivity(info: dict[str, Any]) -> str:
    if info["since"] is None:
        return "[dim]offline, never connected[/dim]"
    if info["connected"]:
        return f"[green]online[/green] since {_when(info['since'])}"
    reason = info.get("disconnectReason")
    return f"[red]offline[/red] since {_when(info['since'])}" + (
        f" ({escape(reason)})" if reason else ""
    )


@thing_app.command("delete")
@one_line_errors
def thing_delete(name: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Delete a thing (its shadows and memberships go; its certificates turn INACTIVE)."""
    with CloudClient(url) as api:
        api.call("DELETE", f"/things/{_q(name)}")
    if as_json:
        print_json({"thingName": name, "deleted": True})
        return
    console.print(f"deleted thing {escape(name)}", highlight=False)


# == groups ===============================================================================


@group_app.command("create")
@one_line_errors
def group_create(
    name: str,
    query: Annotated[
        str | None,
        typer.Option(help="A fleet query: makes the group dynamic, its members the matches."),
    ] = None,
    description: Annotated[str, typer.Option(help="What the group is for.")] = "",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a static group, or a dynamic one with --query."""
    body: dict[str, Any] = {
        "thingGroupName": name,
        "kind": "dynamic" if query is not None else "static",
        "description": description,
    }
    if query is not None:
        body["query"] = query
    with CloudClient(url) as api:
        group = api.call("POST", "/groups", json_body=body, fields={"query": "--query"})
    if as_json:
        print_json(group)
        return
    line = f"created {group['kind']} group {escape(group['thingGroupName'])}"
    if group["kind"] == "dynamic":
        count = len(group["members"])
        line += f" ({escape(group['query'])}): {count} member{'s' if count != 1 else ''}"
    console.print(line, highlight=False)


@group_app.command("add")
@one_line_errors
def group_add(group: str, thing: str, url: UrlOption = None, as_json: JsonOption = False) -> None:
    """Add a thing to a static group."""
    with CloudClient(url) as api:
        result = api.call("PUT", f"/groups/{_q(group)}/things/{_q(thing)}")
    if as_json:
        print_json(result)
        return
    if result["changed"]:
        console.print(f"added {escape(thing)} to {escape(group)}", highlight=False)
    else:
        console.print(f"{escape(thing)} was already in {escape(group)}", highlight=False)


@group_app.command("list")
@one_line_errors
def group_list(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List the thing groups."""
    with CloudClient(url) as api:
        groups = api.call("GET", "/groups")["groups"]
    if as_json:
        print_json(groups)
        return
    table = Table(title=f"{len(groups)} group{'s' if len(groups) != 1 else ''}")
    for column in ("name", "kind", "query", "description", "created"):
        table.add_column(column, overflow="fold")
    for group in groups:
        table.add_row(
            escape(group["thingGroupName"]),
            group["kind"],
            escape(group["query"] or ""),
            escape(group["description"]),
            _when(group["createdAt"]),
        )
    console.print(table)


# == certificates and claims ==============================================================


@cert_app.command("issue")
@one_line_errors
def cert_issue(
    thing: str,
    csr: Annotated[
        Path | None,
        typer.Option(help="A PEM certificate request; without one the cloud makes the key."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where to write the files.")] = Path("."),
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Issue a device certificate: writes THING.cert.pem, THING.key.pem and root-ca.pem."""
    body: dict[str, Any] = {}
    if csr is not None:
        try:
            body["csrPem"] = csr.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ValidationError(f"cannot read it ({err})", source=str(csr)) from err
    names = {"cert": f"{thing}.cert.pem", "key": f"{thing}.key.pem"}
    _check_out(out, names.values())
    with CloudClient(url) as api:
        issued = api.call(
            "POST", f"/things/{_q(thing)}/certificates", json_body=body, fields={"csrPem": "--csr"}
        )
    files = _write_identity(out, names, issued)
    _report_issued("certificate", issued, files, as_json)


@cert_app.command("revoke")
@one_line_errors
def cert_revoke(
    certificate_id: Annotated[str, typer.Argument(metavar="CERT_ID")],
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "unspecified",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a certificate for good; the broker refuses it from then on."""
    with CloudClient(url) as api:
        cert = api.call(
            "POST",
            f"/certificates/{_q(certificate_id)}/revoke",
            json_body={"reason": reason},
            fields={"reason": "--reason"},
        )
    if as_json:
        print_json(cert)
        return
    owner = f" of {escape(cert['thingName'])}" if cert["thingName"] else ""
    console.print(
        f"revoked certificate {cert['certificateId']}{owner} ({escape(cert['revokeReason'])})",
        highlight=False,
    )
    if not cert["brokerNotified"]:
        console.print(
            "[yellow]the broker could not be told now; it refuses the certificate from its "
            "next start[/yellow]"
        )


@claim_app.command("create")
@one_line_errors
def claim_create(
    template: str,
    out: Annotated[Path, typer.Option(help="Where to write the files.")] = Path("."),
    description: Annotated[str, typer.Option(help="Describes a new template.")] = "",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a claim certificate for a factory image: writes claim-TEMPLATE.cert.pem,
    claim-TEMPLATE.key.pem and root-ca.pem."""
    names = {"cert": f"claim-{template}.cert.pem", "key": f"claim-{template}.key.pem"}
    _check_out(out, names.values())
    with CloudClient(url) as api:
        claim = api.call(
            "POST", "/claims", json_body={"template": template, "description": description}
        )
    files = _write_identity(out, names, claim)
    _report_issued("claim certificate", claim, files, as_json)
    if not as_json and claim["templateCreated"]:
        console.print(f"created provisioning template {escape(template)}", highlight=False)


def _check_out(out: Path, names: Any) -> None:
    """Before anything is issued: a key returned once must have somewhere to go."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValidationError(f"cannot create it ({err.strerror})", field="--out") from err
    if not os.access(out, os.W_OK):
        raise ValidationError(f"{out} is not writable", field="--out")
    for name in names:
        if (out / name).exists():
            raise ValidationError(
                f"{out / name} exists; move it away or choose another --out", field="--out"
            )


def _write_identity(out: Path, names: dict[str, str], issued: dict[str, Any]) -> dict[str, str]:
    files = {"cert": out / names["cert"], "rootCa": out / "root-ca.pem"}
    _write(files["cert"], issued["certificatePem"])
    # The chain runs issuer first, root last; a device needs only the root to trust the
    # broker, which presents the rest.
    _write(files["rootCa"], PEM_CERT.findall(issued["chainPem"])[-1] + "\n")
    if issued.get("privateKeyPem"):
        files["key"] = out / names["key"]
        _write(files["key"], issued["privateKeyPem"], mode=0o600)
    return {role: str(path) for role, path in files.items()}


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Whole or not at all: a temporary file, renamed, created with its final mode."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow it
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _report_issued(kind: str, issued: dict[str, Any], files: dict[str, str], as_json: bool) -> None:
    if as_json:
        # The key is in its file; it has no business in logs of scripts' output.
        print_json({**{k: v for k, v in issued.items() if k != "privateKeyPem"}, "files": files})
        return
    console.print(f"{kind} {issued['certificateId']}", highlight=False)
    for path in files.values():
        console.print(f"  wrote {escape(path)}", highlight=False)


# == fleet ================================================================================


@fleet_app.command("query")
@one_line_errors
def fleet_query(
    expr: Annotated[str, typer.Argument(metavar="EXPR", help="e.g. 'attributes.model:pi4'")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Names of the things matching a fleet query, and how many."""
    with CloudClient(url) as api:
        result = api.call("GET", "/fleet/query", params={"q": expr}, fields={"q": "query"})
    if as_json:
        print_json(result)
        return
    for name in result["things"]:
        console.print(escape(name), highlight=False)
    count = result["count"]
    console.print(f"[dim]{count} thing{'s match' if count != 1 else ' matches'}[/dim]")


# == shadows ==============================================================================

ShadowNameOption = Annotated[
    str | None, typer.Option("--name", help="A named shadow (default: the classic shadow).")
]


def _shadow_path(thing: str, name: str | None) -> tuple[str, str]:
    if name:
        return f"/things/{_q(thing)}/shadows/{_q(name)}", f"shadow {name!r} of thing {thing!r}"
    return f"/things/{_q(thing)}/shadow", f"classic shadow of thing {thing!r}"


@shadow_app.command("get")
@one_line_errors
def shadow_get(
    thing: str, name: ShadowNameOption = None, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Show a shadow: desired, reported and delta."""
    path, what = _shadow_path(thing, name)
    with CloudClient(url) as api:
        doc = api.call("GET", path, what=what)
    if as_json:
        print_json(doc)
        return
    console.print(
        f"{escape(what)}, version {doc['version']}, updated "
        f"{_when(datetime.fromtimestamp(doc['timestamp'], UTC).isoformat())}",
        highlight=False,
    )
    console.print_json(data=doc.get("state", {}))


@shadow_app.command("update")
@one_line_errors
def shadow_update(
    thing: str,
    desired: Annotated[
        str | None, typer.Option(help="The desired state: a JSON object (or null), or @FILE.")
    ] = None,
    reported: Annotated[
        str | None, typer.Option(help="The reported state: a JSON object (or null), or @FILE.")
    ] = None,
    name: ShadowNameOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Update a shadow's desired and/or reported state (null clears it)."""
    if desired is None and reported is None:
        raise ValidationError("give --desired or --reported (or both)", field="--desired")
    state: dict[str, Any] = {}
    if desired is not None:
        state["desired"] = _state_json(desired, "--desired")
    if reported is not None:
        state["reported"] = _state_json(reported, "--reported")
    path, what = _shadow_path(thing, name)
    with CloudClient(url) as api:
        doc = api.call("POST", path, json_body={"state": state}, what=what)
    if as_json:
        print_json(doc)
        return
    console.print(f"{escape(what)} is at version {doc['version']}", highlight=False)


def _state_json(text: str, option: str) -> Any:
    source = option
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text(encoding="utf-8")
        except OSError as err:
            raise ValidationError(f"cannot read it ({err.strerror})", source=source) from err
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValidationError(f"not valid JSON ({err})", source=source) from err
    if value is not None and not isinstance(value, dict):
        raise ValidationError("must be a JSON object, or null to clear it", source=source)
    return value


# == components ===========================================================================


@component_app.command("publish")
@one_line_errors
def component_publish(
    recipe: Annotated[
        Path, typer.Argument(metavar="RECIPE", help="A recipe file: .json, .yaml or .yml.")
    ],
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            metavar="DIR",
            help="The folder of the recipe's artifact files: DIR/FILE or DIR/NAME/VERSION/FILE.",
        ),
    ] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a component version from a recipe and its artifact files.

    The recipe is checked with the hub's parser, the artifacts the registry lacks are
    uploaded, then the recipe; its artifact URIs become edgeloop://components/NAME/VERSION/FILE.
    """
    from edgeloop.core.recipe import load_recipe
    from edgeloop.core.registry_uri import is_registry_uri

    parsed = load_recipe(recipe)  # the hub's parser: errors name the file and the field
    if artifacts is not None and not artifacts.is_dir():
        raise ValidationError(f"{artifacts} is not a folder", field="--artifacts")
    files: dict[str, Path] = {}
    for i, manifest in enumerate(parsed.manifests):
        for j, artifact in enumerate(manifest.artifacts):
            name = artifact.file_name
            if name in files:
                continue
            local = _artifact_file(artifacts, parsed.name, str(parsed.version), name)
            if local is not None:
                files[name] = local
            elif not is_registry_uri(artifact.uri):
                where = (
                    f"put it in {artifacts} (as {name}, or {parsed.name}/{parsed.version}/{name})"
                    if artifacts is not None
                    else "give the folder that holds it with --artifacts DIR"
                )
                raise ValidationError(
                    f"artifact file {name!r} is not there: {where}",
                    source=str(recipe),
                    field=f"Manifests[{i}].Artifacts[{j}].Uri",
                )
    digests = {name: _sha256_file(path) for name, path in files.items()}
    with CloudClient(url) as api:
        missing = [
            name
            for name, sha in digests.items()
            if api.call("GET", f"/components/blobs/{sha}", missing_ok=True) is None
        ]
        _upload(api, {name: (files[name], digests[name]) for name in missing}, quiet=as_json)
        published = api.call(
            "POST",
            "/components",
            json_body={
                "recipe": recipe.read_bytes().decode("utf-8-sig"),
                "format": "json" if recipe.suffix.lower() == ".json" else "yaml",
                "artifacts": digests,
                "source": str(recipe),
            },
        )
    if as_json:
        print_json({**published, "uploaded": sorted(missing)})
        return
    what = f"{escape(published['componentName'])} {escape(published['componentVersion'])}"
    if not published["created"]:
        console.print(f"{what} is already published with this content", highlight=False)
        return
    count = len(published["artifacts"])
    console.print(
        f"published {what}: {count} artifact{'s' if count != 1 else ''}, "
        f"{_bytes(published['size'])} ({len(missing)} uploaded)",
        highlight=False,
    )


def _artifact_file(folder: Path | None, name: str, version: str, file: str) -> Path | None:
    if folder is None:
        return None
    for candidate in (folder / file, folder / name / version / file):
        if candidate.is_file():
            return candidate
    return None


def _sha256_file(path: Path) -> str:
    import hashlib

    hasher = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
    except OSError as err:
        raise ValidationError(f"cannot read it ({err.strerror})", source=str(path)) from err
    return hasher.hexdigest()


def _upload(api: CloudClient, blobs: dict[str, tuple[Path, str]], *, quiet: bool) -> None:
    """PUT each file's bytes, streamed, with a progress bar on a terminal."""
    from collections.abc import Iterator

    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    if not blobs:
        return
    show = not quiet and console.is_terminal
    total = sum(path.stat().st_size for path, _ in blobs.values())
    with Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=console,
        transient=True,
        disable=not show,
    ) as progress:
        task = progress.add_task("", total=total)
        for name, (path, sha) in blobs.items():
            progress.update(task, description=escape(name))

            def chunks(path: Path = path) -> Iterator[bytes]:
                with path.open("rb") as handle:
                    while chunk := handle.read(1 << 20):
                        progress.advance(task, len(chunk))
                        yield chunk

            api.call("PUT", f"/components/blobs/{sha}", content=chunks())


@component_app.command("list")
@one_line_errors
def component_list(
    prefix: Annotated[str, typer.Option(help="Only names starting with this.")] = "",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the registry's components, with their versions newest first."""
    with CloudClient(url) as api:
        components = api.call("GET", "/components", params={"prefix": prefix})["components"]
    if as_json:
        print_json(components)
        return
    table = Table(title=f"{len(components)} component{'s' if len(components) != 1 else ''}")
    for column in ("name", "latest", "versions", "description", "updated"):
        table.add_column(column, overflow="fold")
    for component in components:
        table.add_row(
            escape(component["componentName"]),
            escape(component["latestVersion"]),
            escape(", ".join(component["versions"])),
            escape(component["description"]),
            _when(component["updatedAt"]),
        )
    console.print(table)


@component_app.command("show")
@one_line_errors
def component_show(
    name: str,
    version: Annotated[str | None, typer.Argument(help="One version (default: all).")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a component's versions, or one version's artifacts, digests and sizes."""
    with CloudClient(url) as api:
        if version is None:
            detail = api.call("GET", f"/components/{_q(name)}")
        else:
            detail = api.call("GET", f"/components/{_q(name)}/versions/{_q(version)}")
    if as_json:
        print_json(detail)
        return
    if version is None:
        table = Table(title=f"component {escape(name)}")
        for column in ("version", "artifacts", "size", "recipe sha256", "published"):
            table.add_column(column, overflow="fold")
        for item in detail["versions"]:
            table.add_row(
                escape(item["componentVersion"]),
                str(len(item["artifacts"])),
                _bytes(item["size"]),
                item["recipeSha256"][:16],
                _when(item["createdAt"]),
            )
        console.print(table)
        return
    console.print(
        f"[bold]{escape(detail['componentName'])}[/bold] {escape(detail['componentVersion'])}, "
        f"published {_when(detail['createdAt'])}",
        highlight=False,
    )
    for label, key in (("description", "description"), ("publisher", "publisher")):
        if detail[key]:
            console.print(f"{label}: {escape(detail[key])}", highlight=False)
    console.print(f"recipe sha256: {detail['recipeSha256']}", highlight=False)
    if not detail["artifacts"]:
        console.print("artifacts: none")
        return
    table = Table(title="artifacts")
    for column in ("file", "size", "sha256", "uri"):
        table.add_column(column, overflow="fold")
    for artifact in detail["artifacts"]:
        table.add_row(
            escape(artifact["file"]),
            _bytes(artifact["size"]),
            artifact["sha256"],
            escape(artifact["uri"]),
        )
    console.print(table)


@component_app.command("delete")
@one_line_errors
def component_delete(
    name: str, version: str, url: UrlOption = None, as_json: JsonOption = False
) -> None:
    """Delete a component version (refused while a deployment uses it)."""
    with CloudClient(url) as api:
        api.call("DELETE", f"/components/{_q(name)}/versions/{_q(version)}")
    if as_json:
        print_json({"componentName": name, "componentVersion": version, "deleted": True})
        return
    console.print(f"deleted {escape(name)} {escape(version)}", highlight=False)


def _bytes(size: int) -> str:
    """A size for people: 980 B, 12.3 kB, 4.5 MB."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


# == formatting ===========================================================================


def _q(segment: str) -> str:
    """A name as one path segment, whatever it holds."""
    return quote(segment, safe="")


def _attributes(attributes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(attributes.items()))


def _when(iso: str | None) -> str:
    """An API timestamp as UTC minutes, with how long ago when recent."""
    if not iso:
        return "-"
    at = datetime.fromisoformat(iso)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    seconds = max(0.0, time.time() - at.timestamp())
    stamp = at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    if seconds < 90:
        return f"{stamp} ({seconds:.0f}s ago)"
    if seconds < 5400:
        return f"{stamp} ({seconds / 60:.0f}m ago)"
    return stamp
