"""The ML loop of one running cloud: its datasets, its model registry, and training runs.

A training run is started by the API and runs in a background thread of the cloud's
process (its fits in a process pool, or on a Dask cluster), so that a request returns at
once and the command line follows the run's progress by polling it. Runs are kept in
memory, the last ``KEEP_RUNS`` of them: what a run produced lives on in the registry
(versions, with the dataset hash), and a cloud restarted mid-run has simply not trained.
One run at a time: fits already use every core (or the cluster).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from edgeloop.cloud.db import Database, utcnow
from edgeloop.cloud.ml.dataset import Datasets
from edgeloop.cloud.ml.packaging import Packaged, package
from edgeloop.cloud.ml.registry import ModelRegistry
from edgeloop.cloud.ml.training import Progress, TrainingOptions, TrainingOutcome, train
from edgeloop.cloud.objectstore import ObjectStore
from edgeloop.core.errors import ConflictError, EdgeloopError, NotFoundError

if TYPE_CHECKING:
    from edgeloop.cloud.components import ComponentRegistry
    from edgeloop.cloud.lake import Lake

__all__ = ["KEEP_RUNS", "MlLoop", "TrainingRun"]

log = logging.getLogger("edgeloop.cloud.ml")
KEEP_RUNS = 50


@dataclass
class TrainingRun:
    """A training run's state, as the API shows it."""

    id: str
    options: TrainingOptions
    state: str = "queued"  # queued, running, succeeded, failed
    phase: str = "queued"
    done: int = 0
    total: int = 0
    message: str = ""
    log: list[str] = field(default_factory=list)
    started_at: datetime = field(default_factory=utcnow)
    finished_at: datetime | None = None
    outcome: TrainingOutcome | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        spec = self.options.spec.to_json()
        return {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "message": self.message,
            "log": list(self.log),
            "startedAt": self.started_at.isoformat(),
            "finishedAt": self.finished_at.isoformat() if self.finished_at else None,
            "request": {
                **spec,
                "holdout": self.options.holdout,
                "perDevice": self.options.per_device,
                "cluster": self.options.cluster,
                "by": self.options.created_by,
            },
            "outcome": self.outcome.to_json() if self.outcome else None,
            "error": self.error,
        }


class MlLoop:
    """Datasets, the model registry and training runs over one install."""

    def __init__(
        self,
        db: Database,
        objects: ObjectStore,
        lake: Lake,
        components: Callable[[], ComponentRegistry],
    ) -> None:
        self.datasets = Datasets(db, objects, lake)
        self.models = ModelRegistry(db, objects)
        self._components = components
        self._runs: OrderedDict[str, TrainingRun] = OrderedDict()
        self._lock = threading.Lock()

    # -- training ------------------------------------------------------------------------

    def start_training(self, options: TrainingOptions) -> TrainingRun:
        """Start a run in the background; ConflictError while another one runs."""
        with self._lock:
            busy = [r for r in self._runs.values() if r.state in ("queued", "running")]
            if busy:
                raise ConflictError(
                    f"training run {busy[0].id} is still {busy[0].state}; wait for it "
                    f"(edgeloop cloud ml runs)"
                )
            run = TrainingRun(id=uuid.uuid4().hex[:12], options=options)
            self._runs[run.id] = run
            while len(self._runs) > KEEP_RUNS:
                self._runs.popitem(last=False)
        threading.Thread(
            target=self._run, args=(run,), name=f"ml-train-{run.id}", daemon=True
        ).start()
        return run

    def train_now(
        self, options: TrainingOptions, progress: Callable[[Progress], None] = lambda s: None
    ) -> TrainingOutcome:
        """Train in the calling thread (tests, scripts)."""
        return train(self.datasets, self.models, options, progress=progress)

    def _run(self, run: TrainingRun) -> None:
        run.state = "running"

        def step(progress: Progress) -> None:
            run.phase, run.done, run.total, run.message = (
                progress.phase,
                progress.done,
                progress.total,
                progress.message,
            )
            run.log.append(f"{progress.phase}: {progress.message}")

        try:
            run.outcome = train(self.datasets, self.models, run.options, progress=step)
            run.state = "succeeded"
        except EdgeloopError as err:
            run.error = str(err)
            run.state = "failed"
        except Exception as err:  # a bug or a worker's crash: the run says so
            log.exception("training run %s failed", run.id)
            run.error = f"{type(err).__name__}: {err}"
            run.state = "failed"
        finally:
            run.finished_at = utcnow()

    def run(self, run_id: str) -> TrainingRun:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFoundError("training run", run_id, "list them with: edgeloop cloud ml runs")
        return run

    def runs(self) -> list[TrainingRun]:
        """The runs kept, newest first."""
        return list(reversed(self._runs.values()))

    # -- packaging -----------------------------------------------------------------------

    def package(self, name: str, ref: int | str | None) -> Packaged:
        """Publish a model version as ``edgeloop.model.<name>`` (see packaging)."""
        return package(self.models, self._components(), name, ref)
