"""Worker membership: where workers are found. `EmbeddedRegistry` keeps a pipeline's own
workers in-process; etcd (`EtcdClient`, `serve_registration` on the worker's side,
`WorkerWatcher` / `watch_workers` on the frontend's) lets several frontends find several
workers (docs/deploying.md). A `WorkerRecord` names its engine kind; the watcher builds
engines only through `interlock.engines.engine_from_record`, so discovery imports no kind."""

from ._embedded import EmbeddedRegistry
from ._etcd import (
    DEFAULT_PREFIX,
    BadRecord,
    EtcdClient,
    EtcdError,
    KeyValue,
    WatchEvent,
    WorkerPool,
    WorkerRecord,
    WorkerWatcher,
    register_worker,
    serve_registration,
    watch_workers,
    worker_key,
    workers_prefix,
)

__all__ = [
    "DEFAULT_PREFIX",
    "BadRecord",
    "EmbeddedRegistry",
    "EtcdClient",
    "EtcdError",
    "KeyValue",
    "WatchEvent",
    "WorkerPool",
    "WorkerRecord",
    "WorkerWatcher",
    "register_worker",
    "serve_registration",
    "watch_workers",
    "worker_key",
    "workers_prefix",
]
