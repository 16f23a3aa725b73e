"""The Ray executor (`autointerp run --engine ray`): claimed chunks and tasks (collection shards) run as Ray tasks
across a cluster, from the same plain data the process pool gets; the database stays the one record of what is
done. The only module that imports Ray (the optional extra `autointerp[ray]`), and only when it is used.

Each task asks for one GPU where the cluster has GPUs, one CPU otherwise; Ray retries a task whose worker or node
died (`max_retries`); a shard also when it raised (its stored state is replaced, so a retry is safe). Without an
address a local cluster is started (and stopped with the job); `auto` or `ray://HOST:10001` joins a running one,
which the job leaves running.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from autointerp.jobs.executors import ChunkSpec, run_spec
from autointerp.jobs.stage import ChunkResult, Stage, run_task

MAX_RETRIES = 3


class RayError(RuntimeError):
    """Ray is not installed, or its cluster cannot be reached."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayError("--engine ray needs Ray: pip install 'autointerp[ray]'") from None
    return ray


class RayExecutor:
    """Chunks and tasks as Ray tasks. `slots`: the cluster's GPUs, else its CPUs (or `slots` when given)."""

    def __init__(self, address: str | None = None, *, slots: int | None = None, num_cpus: int | None = None) -> None:
        ray = self.ray = _import_ray()
        self._owned = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 (a connection refused, a bad address: said with the address)
                raise RayError(f"cannot start or reach a Ray cluster at {address or 'a new local one'}: "
                               f"{type(exc).__name__}: {exc}") from None  # fmt: skip
            self._owned = True
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        self.slots = slots or max(1, self.gpus or int(res.get("CPU", 1)))
        opts: dict[str, Any] = {"max_retries": MAX_RETRIES, "num_gpus": 1} if self.gpus else {"num_cpus": 1}
        opts |= {"max_retries": MAX_RETRIES}
        # a task (a shard) is idempotent: retried on its own exceptions too; a chunk that raised has written its
        # failures as rows, and its units go back through the loop instead
        self._task = ray.remote(**opts, retry_exceptions=True)(run_task)
        self._chunk = ray.remote(**opts)(run_spec)
        self._refs: list[Any] = []

    def describe(self) -> str:
        res = self.ray.cluster_resources()
        nodes = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        return f"Ray: {nodes} node(s), {int(res.get('CPU', 0))} CPUs, {self.gpus} GPUs; {self.slots} tasks at once"

    def _track(self, ref: Any) -> Future[Any]:
        self._refs = [r for r in self._refs if not _ready(self.ray, r)] + [ref]
        fut: Future[Any] = ref.future()
        return fut

    def submit(self, stage: Stage, spec: ChunkSpec) -> Future[ChunkResult]:  # noqa: ARG002 (rebuilt from the spec)
        return self._track(self._chunk.remote(spec))

    def call(self, task: str, payload: dict[str, Any]) -> Future[dict[str, Any]]:
        return self._track(self._task.remote(task, payload))

    def start(self, stages: Sequence[str]) -> None:
        pass

    def cancel(self) -> None:
        for ref in self._refs:
            self.ray.cancel(ref, force=True)
        self._refs = []

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()
        self._owned = False


def _ready(ray: Any, ref: Any) -> bool:
    done, _ = ray.wait([ref], timeout=0)
    return bool(done)
