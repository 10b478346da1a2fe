"""Training from the lake: a snapshot, models per appliance kind (and per kit where that
pays) fitted in a process pool and on a real local Dask cluster — the same models either
way — evaluated on held-out labelled readings and registered with their provenance."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgeloop.cloud.context import CloudContext
from edgeloop.cloud.ml import training
from edgeloop.cloud.ml.dataset import DatasetSpec, appliance_data
from edgeloop.cloud.ml.training import (
    Progress,
    TrainingOptions,
    TrainingOutcome,
    plan,
    run_tasks,
)
from edgeloop.core.errors import CloudError, ValidationError
from edgeloop.ml.appliance_model import AnomalyModel, FitConfig

from .ml_data import ingest, kit_payloads

# Small and quick: fewer states and EM steps than the defaults.
CONFIG = FitConfig(components=8, iterations=20)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudContext]:
    context = CloudContext.open(tmp_path_factory.mktemp("cloud"))
    lake = context.lake
    ingest(lake, "hub-a", kit_payloads("fridge-1", "fridge", 30, seed=11), stream="fridge-1")
    ingest(lake, "hub-b", kit_payloads("fridge-1", "fridge", 30, seed=12), stream="fridge-1")
    faults = [
        {"fault": "stuck_relay_on", "at": "26h", "until": "28h"},
        {"fault": "spikes", "at": "22h", "until": "24h"},
    ]
    ingest(
        lake,
        "hub-c",
        kit_payloads("fridge-2", "fridge", 30, seed=13, faults=faults),
        stream="fridge-2",
    )
    yield context
    context.db.dispose()


@pytest.fixture(scope="module")
def outcome(ctx: CloudContext) -> tuple[TrainingOutcome, list[Progress]]:
    steps: list[Progress] = []
    options = TrainingOptions(config=CONFIG, workers=2, created_by="alice")
    return ctx.ml.train_now(options, steps.append), steps


def test_training_registers_evaluated_versions_with_their_provenance(
    ctx: CloudContext, outcome: tuple[TrainingOutcome, list[Progress]]
) -> None:
    result, steps = outcome
    names = [v.name for v in result.registered]
    assert names[0] == "fridge"
    kind = result.registered[0]
    assert kind.version == 1 and kind.scope == "kind" and kind.created_by == "alice"
    assert kind.dataset_hash == result.dataset_hash
    assert ctx.ml.datasets.get(result.dataset_hash).rows == result.readings == 3 * 10_800
    assert kind.code_version.startswith("0.1.0")
    assert kind.params["executor"] == "process-pool"
    assert kind.params["sensors"] == [
        "cabinet_temp_c",
        "compressor_current_a",
        "duty_cycle_pct",
        "vibration_rms_g",
    ]
    # Evaluated on the held-out last 30 % of each kit, where hub-c's faults are.
    metrics = kind.metrics
    assert metrics["episodes"] == 2 and metrics["recall"] == 1.0
    assert metrics["precision"] >= 0.5
    assert set(metrics["faults"]) == {"stuck_relay_on", "spikes"}
    assert set(metrics["perDevice"]) == {"hub-a/fridge-1", "hub-b/fridge-1", "hub-c/fridge-2"}
    # Each kit's own model is kept only where it beats the kind's; the rest say why.
    decided = {v.device for v in result.registered[1:]} | {s["device"] for s in result.skipped}
    assert decided == set(metrics["perDevice"])
    for version in result.registered[1:]:
        assert version.scope == "device" and version.name == f"fridge.{version.device}".replace(
            "/", "."
        )
        assert version.metrics["f1"] >= version.metrics["kindModel"]["f1"]
    # The artifact is the model, and scores readings.
    model = AnomalyModel.from_bytes(ctx.ml.models.artifact("fridge", 1))
    assert model.appliance == "fridge" and model.threshold == kind.params["threshold"]
    # Progress: the snapshot, each fit, the registration.
    phases = [s.phase for s in steps]
    assert phases[0] == "snapshot" and phases[-1] == "done"
    fits = [s for s in steps if s.phase == "fit" and s.done]
    assert [s.done for s in fits] == list(range(1, fits[0].total + 1))


def test_a_dask_cluster_fits_the_same_models(
    ctx: CloudContext, outcome: tuple[TrainingOutcome, list[Progress]]
) -> None:
    from distributed import LocalCluster

    result, _ = outcome
    table = ctx.ml.datasets.load(result.dataset_hash)
    options = TrainingOptions(config=CONFIG, per_device=False)
    tasks = plan(list(appliance_data(table)), options)
    assert [t.name for t in tasks] == ["fridge"]
    with LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        done: list[str] = []
        (fitted,) = run_tasks(
            tasks, cluster=cluster.scheduler_address, on_done=lambda r: done.append(r.name)
        )
    assert done == ["fridge"]
    assert fitted.artifact == ctx.ml.models.artifact("fridge", 1)
    assert fitted.quality == {
        k: v for k, v in result.registered[0].metrics.items() if k in fitted.quality
    }


def test_unreachable_clusters_and_empty_selections_say_so(
    ctx: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "DASK_CONNECT_TIMEOUT", 1.0)
    with pytest.raises(ValidationError, match="cluster"):
        TrainingOptions(cluster="localhost:8786")
    with pytest.raises(CloudError, match="Dask scheduler"):
        ctx.ml.train_now(TrainingOptions(cluster="tcp://127.0.0.1:9", config=CONFIG))
    with pytest.raises(ValidationError, match="no readings"):
        ctx.ml.train_now(TrainingOptions(spec=DatasetSpec(appliances=("washer",))))


def test_the_plan_trains_on_normal_runs_and_leaves_out_rare_sensors() -> None:
    import numpy as np

    from edgeloop.cloud.ml.dataset import ApplianceData, KitData

    n = 10_000
    values = np.random.default_rng(0).normal(size=(n, 3))
    values[: n // 4 * 3, 2] = np.nan  # a sensor only a quarter of the readings have
    labels = ["normal"] * n
    labels[3000:3100] = ["spikes"] * 100  # a fault: training runs end and start around it
    kits = tuple(
        KitData(thing, "pump-1", values, tuple(labels), np.arange(n, dtype=np.int64) * 5000)
        for thing in ("hub-a", "hub-b")
    )
    data = ApplianceData(appliance="pump", sensors=("a", "b", "rare"), kits=kits)
    tasks = plan([data], TrainingOptions(holdout=0.3))
    assert [(t.name, t.scope) for t in tasks] == [
        ("pump", "kind"),
        ("pump.hub-a.pump-1", "device"),
        ("pump.hub-b.pump-1", "device"),
    ]
    kind = tasks[0]
    assert kind.sensors == ("a", "b")
    # Per kit: readings 0-2999 and 3100-6999 (the last 30 % held out).
    assert [len(s) for s in kind.train] == [3000, 3900, 3000, 3900]
    assert all(s.shape[1] == 2 for s in kind.train)
    assert [d for d, _ in kind.holdout] == ["hub-a/pump-1", "hub-b/pump-1"]
    assert len(kind.holdout[0][1].labels) == 3000
    assert tasks[1].holdout == (kind.holdout[0],)
    # Without per-device models, or with one kit only: the kind's model alone.
    assert len(plan([data], TrainingOptions(per_device=False))) == 1
    single = ApplianceData(appliance="pump", sensors=data.sensors, kits=kits[:1])
    assert len(plan([single], TrainingOptions())) == 1
