"""Training: a dataset snapshot in, evaluated model versions in the registry out.

1. **Snapshot** the lake (:mod:`edgeloop.cloud.ml.dataset`): the readings of the chosen
   appliance kinds and time range, stored under their content hash.
2. **Split** each kit's readings in time: the first ``1 - holdout`` for training, the
   rest held out for evaluation. Training sees only normal readings (labelled
   ``normal`` or unlabelled), as the runs between labelled faults.
3. **Fit** one model per appliance kind on all its kits, and, with ``per_device``, one
   per kit with enough readings of its own, as independent tasks: in a local process
   pool by default, or on a Dask cluster (``cluster="tcp://host:port"``). Each task is a
   pure function of its inputs (:func:`fit_task`), seeded, so both give identical models.
4. **Evaluate** every model on held-out labelled readings
   (:mod:`edgeloop.ml.appliance_evaluation`): the kind's model on each of its kits, a
   kit's own model on that kit. A kit's own model is registered only *where it pays*: when
   it beats the kind's model on the kit's held-out readings (higher F1, or the same F1
   with fewer false alarms).
5. **Register** each kept model as a new version (:mod:`edgeloop.cloud.ml.registry`) with
   its metrics, parameters, the dataset hash and the code version.

``progress`` hears each step (:class:`Progress`), so a command line or an API can show it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgeloop.cloud.ml.dataset import ApplianceData, Datasets, DatasetSpec, KitData, appliance_data
from edgeloop.cloud.ml.registry import ModelRegistry, ModelVersion, check_name, code_version
from edgeloop.core.errors import CloudError, ValidationError
from edgeloop.ml.appliance_evaluation import LabelledSequence, Quality, evaluate
from edgeloop.ml.appliance_model import AnomalyModel, FitConfig, fit

__all__ = [
    "FitTask",
    "Progress",
    "TaskResult",
    "TrainingOptions",
    "TrainingOutcome",
    "fit_task",
    "model_name",
    "plan",
    "run_tasks",
    "train",
]

log = logging.getLogger("edgeloop.cloud.ml")

MIN_SEGMENT = 200  # normal readings in a row worth training on
MIN_DEVICE_READINGS = 5_000  # a kit's own training readings before it gets its own model
DEVICE_MARGIN = 0.02  # F1 a kit's own model must gain over its kind's to be kept
DASK_CONNECT_TIMEOUT = 10.0  # seconds to reach a Dask scheduler
MIN_SENSOR_SHARE = 0.5  # of a kind's readings a sensor must be in to be modelled


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """What to train, and where."""

    spec: DatasetSpec = field(default_factory=DatasetSpec)
    holdout: float = 0.3  # of each kit's readings (the latest) held out for evaluation
    per_device: bool = True
    cluster: str | None = None  # a Dask scheduler, tcp://host:port; None: a process pool
    workers: int | None = None  # processes of the pool (default: the CPUs)
    config: FitConfig = field(default_factory=FitConfig)
    created_by: str = "edgeloop"

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise ValidationError("must be between 0 and 1", field="holdout")
        if self.cluster is not None and not self.cluster.startswith(("tcp://", "tls://")):
            raise ValidationError(
                f"{self.cluster!r} is not a Dask scheduler address (tcp://host:port)",
                field="cluster",
            )
        if self.workers is not None and self.workers < 1:
            raise ValidationError("must be at least 1", field="workers")


@dataclass(frozen=True)
class Progress:
    """One step of a training run: ``phase`` (snapshot, fit, register, done), how many of
    its steps are done of ``total``, and a line about the latest."""

    phase: str
    done: int
    total: int
    message: str


@dataclass(frozen=True)
class FitTask:
    """One model to fit: pure data, so that it can travel to a process or a Dask worker."""

    name: str
    appliance: str
    scope: str  # "kind" or "device"
    device: str | None
    sensors: tuple[str, ...]
    train: tuple[np.ndarray[Any, Any], ...]  # normal segments, each in time order
    holdout: tuple[tuple[str, LabelledSequence], ...]  # (device, its held-out readings)
    config: FitConfig


@dataclass(frozen=True)
class TaskResult:
    """A fitted model and its quality, overall and per device."""

    name: str
    appliance: str
    scope: str
    device: str | None
    artifact: bytes
    quality: dict[str, Any]
    per_device: dict[str, dict[str, Any]]
    train_readings: int
    seconds: float


def model_name(appliance: str, device: str | None = None) -> str:
    """``<appliance>`` for a kind's model; ``<appliance>.<thing>.<kit>`` for a kit's own."""
    raw = appliance if device is None else f"{appliance}.{device.replace('/', '.')}"
    return check_name(raw.lower())


def fit_task(task: FitTask) -> TaskResult:
    """Fit and evaluate one model (runs in a worker process)."""
    started = time.perf_counter()
    try:
        model = fit(list(task.train), task.sensors, appliance=task.appliance, config=task.config)
    except ValueError as err:  # too little data: said by name, for the run's error
        raise ValueError(f"model {task.name}: {err}") from None
    overall = evaluate(model, [seq for _, seq in task.holdout])
    per_device = {device: _metrics(evaluate(model, [seq])) for device, seq in task.holdout}
    return TaskResult(
        name=task.name,
        appliance=task.appliance,
        scope=task.scope,
        device=task.device,
        artifact=model.to_bytes(),
        quality=_metrics(overall),
        per_device=per_device,
        train_readings=sum(len(t) for t in task.train),
        seconds=time.perf_counter() - started,
    )


def _metrics(quality: Quality) -> dict[str, Any]:
    return quality.to_json()


# --- planning -----------------------------------------------------------------------------


def plan(data: Sequence[ApplianceData], options: TrainingOptions) -> list[FitTask]:
    """The fits a snapshot calls for: a model per kind, and one per kit with enough data."""
    tasks: list[FitTask] = []
    for kind in map(_usual_sensors, data):
        held: list[tuple[str, LabelledSequence]] = []
        segments: list[np.ndarray[Any, Any]] = []
        own: list[tuple[KitData, list[np.ndarray[Any, Any]], LabelledSequence]] = []
        for kit in kind.kits:
            cut = int(len(kit.labels) * (1 - options.holdout))
            kit_segments = list(_normal_segments(kit, cut))
            holdout = LabelledSequence(kit.values[cut:], kit.labels[cut:], kit.ts_ms[cut:])
            segments.extend(kit_segments)
            if len(holdout.labels):
                held.append((kit.device, holdout))
            if sum(len(s) for s in kit_segments) >= MIN_DEVICE_READINGS and len(holdout.labels):
                own.append((kit, kit_segments, holdout))
        if not segments:
            log.warning("no normal readings of %s to train on", kind.appliance)
            continue
        tasks.append(
            FitTask(
                name=model_name(kind.appliance),
                appliance=kind.appliance,
                scope="kind",
                device=None,
                sensors=kind.sensors,
                train=tuple(segments),
                holdout=tuple(held),
                config=options.config,
            )
        )
        if options.per_device and len(kind.kits) > 1:
            for kit, kit_segments, holdout in own:
                tasks.append(
                    FitTask(
                        name=model_name(kind.appliance, kit.device),
                        appliance=kind.appliance,
                        scope="device",
                        device=kit.device,
                        sensors=kind.sensors,
                        train=tuple(kit_segments),
                        holdout=((kit.device, holdout),),
                        config=options.config,
                    )
                )
    return tasks


def _usual_sensors(kind: ApplianceData) -> ApplianceData:
    """The kind's data without sensors that most of its readings lack (a kit variant's
    extra sensor): a model needs readings with all its sensors to learn from."""
    readings = sum(len(kit.labels) for kit in kind.kits)
    present = sum((~np.isnan(kit.values)).sum(axis=0) for kit in kind.kits)
    keep = np.flatnonzero(np.asarray(present) >= MIN_SENSOR_SHARE * readings)
    if len(keep) == len(kind.sensors):
        return kind
    dropped = [s for i, s in enumerate(kind.sensors) if i not in set(keep.tolist())]
    log.warning("%s: leaving out sensors most readings lack: %s", kind.appliance, dropped)
    return ApplianceData(
        appliance=kind.appliance,
        sensors=tuple(kind.sensors[i] for i in keep),
        kits=tuple(
            KitData(k.thing, k.kit, k.values[:, keep], k.labels, k.ts_ms) for k in kind.kits
        ),
    )


def _normal_segments(kit: KitData, stop: int) -> Iterator[np.ndarray[Any, Any]]:
    """Runs of normal (or unlabelled) readings before ``stop``, long enough to learn from."""
    normal = np.array([label in (None, "normal") for label in kit.labels[:stop]], dtype=bool)
    start = None
    for i, ok in enumerate([*normal.tolist(), False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start >= MIN_SEGMENT:
                yield kit.values[start:i]
            start = None


# --- running the fits --------------------------------------------------------------------


def run_tasks(
    tasks: Sequence[FitTask],
    *,
    cluster: str | None = None,
    workers: int | None = None,
    on_done: Callable[[TaskResult], None] = lambda result: None,
) -> list[TaskResult]:
    """Fit every task, in a process pool or on a Dask cluster; results in task order."""
    if not tasks:
        return []
    runner = _dask if cluster else _pool
    results: dict[str, TaskResult] = {}
    for result in runner(tasks, cluster or "", workers):
        results[result.name] = result
        on_done(result)
    return [results[task.name] for task in tasks]


def _pool(tasks: Sequence[FitTask], _: str, workers: int | None) -> Iterator[TaskResult]:
    count = min(len(tasks), workers or os.cpu_count() or 1)
    # spawn, not fork: the cloud's process has threads (the API server, the broker link)
    try:
        with ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(fit_task, task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()
    except BrokenProcessPool as err:
        raise CloudError(
            "a training process died (out of memory?); try fewer --workers, or a cluster"
        ) from err


def _dask(tasks: Sequence[FitTask], address: str, _: int | None) -> Iterator[TaskResult]:
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - a dependency of edgeloop
        raise CloudError("Dask's distributed package is not installed") from err
    try:
        client = Client(  # type: ignore[no-untyped-call]
            address, timeout=DASK_CONNECT_TIMEOUT, set_as_default=False
        )
    except OSError as err:
        raise CloudError(
            f"cannot reach the Dask scheduler at {address} ({err}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS`"
        ) from err
    try:
        finished: queue.Queue[Any] = queue.Queue()
        submitted: list[Any] = client.map(fit_task, list(tasks), pure=False)
        for job in submitted:  # not distributed.as_completed: it wants a default client
            job.add_done_callback(finished.put)
        for _ in submitted:
            yield finished.get().result()
    finally:
        client.close()  # type: ignore[no-untyped-call]


# --- the whole run ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingOutcome:
    """What a training run produced."""

    dataset_hash: str
    readings: int
    registered: tuple[ModelVersion, ...]
    skipped: tuple[dict[str, Any], ...]  # kits' own models that did not pay, and why
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "datasetHash": self.dataset_hash,
            "readings": self.readings,
            "registered": [v.to_json() for v in self.registered],
            "skipped": list(self.skipped),
            "seconds": round(self.seconds, 3),
        }


def train(
    datasets: Datasets,
    registry: ModelRegistry,
    options: TrainingOptions,
    *,
    progress: Callable[[Progress], None] = lambda step: None,
) -> TrainingOutcome:
    """Snapshot, fit, evaluate and register (see the module doc)."""
    started = time.perf_counter()
    progress(Progress("snapshot", 0, 1, "querying the lake"))
    info, table = datasets.snapshot(options.spec)
    data = list(appliance_data(table))
    progress(Progress("snapshot", 1, 1, f"{info.rows:,} readings, dataset {info.hash[:12]}"))
    if not data:
        raise ValidationError(
            "the lake has no readings for these appliances in this time range", field="spec"
        )
    tasks = plan(data, options)
    if not tasks:
        raise ValidationError(
            f"too few normal readings to train on (at least {MIN_SEGMENT} in a row per kit)",
            field="spec",
        )
    done = 0
    total = len(tasks)
    progress(Progress("fit", 0, total, f"{total} models to fit"))

    def fitted(result: TaskResult) -> None:
        nonlocal done
        done += 1
        q = result.quality
        progress(
            Progress(
                "fit",
                done,
                total,
                f"{result.name}: F1 {q['f1']:.2f} ({result.seconds:.1f} s)",
            )
        )

    try:
        results = run_tasks(tasks, cluster=options.cluster, workers=options.workers, on_done=fitted)
    except ValueError as err:
        raise ValidationError(str(err), field="spec") from err
    by_kind = {r.appliance: r for r in results if r.scope == "kind"}
    kept: list[TaskResult] = []
    skipped: list[dict[str, Any]] = []
    for result in results:
        if result.scope == "kind":
            kept.append(result)
            continue
        assert result.device is not None
        baseline = by_kind[result.appliance].per_device.get(result.device)
        if baseline is None or _pays(result.quality, baseline):
            kept.append(result)
        else:
            skipped.append(
                {
                    "name": result.name,
                    "device": result.device,
                    "f1": result.quality["f1"],
                    "kindF1": baseline["f1"],
                    "reason": "the kind's model does as well on this kit",
                }
            )
    code = code_version()
    registered = []
    for i, result in enumerate(kept):
        progress(Progress("register", i, len(kept), f"registering {result.name}"))
        model = AnomalyModel.from_bytes(result.artifact)
        params = {
            **asdict(options.config),
            "sensors": list(model.sensors),
            "threshold": model.threshold,
            "components": len(model.weights),
            "holdout": options.holdout,
            "trainReadings": result.train_readings,
            "fitSeconds": round(result.seconds, 3),
            "executor": "dask" if options.cluster else "process-pool",
        }
        metrics = {**result.quality, "perDevice": result.per_device}
        if result.scope == "device":
            assert result.device is not None
            metrics["kindModel"] = by_kind[result.appliance].per_device.get(result.device)
        registered.append(
            registry.register(
                result.name,
                artifact=result.artifact,
                appliance=result.appliance,
                scope=result.scope,
                device=result.device,
                metrics=metrics,
                params=params,
                dataset_hash=info.hash,
                code=code,
                created_by=options.created_by,
            )
        )
    progress(Progress("done", len(kept), len(kept), f"{len(registered)} versions registered"))
    return TrainingOutcome(
        dataset_hash=info.hash,
        readings=info.rows,
        registered=tuple(registered),
        skipped=tuple(skipped),
        seconds=time.perf_counter() - started,
    )


def _pays(own: dict[str, Any], kind: dict[str, Any]) -> bool:
    """Whether a kit's own model beats its kind's on the kit's held-out readings."""
    if own["f1"] > kind["f1"] + DEVICE_MARGIN:
        return True
    return bool(
        own["f1"] >= kind["f1"] - 1e-9
        and own["false_alarms_per_day"] < kind["false_alarms_per_day"] * 0.5
    )
