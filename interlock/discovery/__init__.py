"""Worker membership: where workers are found. `EmbeddedRegistry` keeps a pipeline's own
workers in-process; etcd (`EtcdClient`, `serve_registration` on the worker's side,
`WorkerWatcher` / `watch_workers` on the frontend's) lets several frontends find several
workers (docs/deploying.md); `EtcdOptions` says how to reach etcd (its user and TLS files:
docs/deploying.md#securing-etcd). A `WorkerRecord` names its engine kind; the watcher builds
engines only through `interlock.engines.engine_from_record`, so discovery imports no kind."""

from ._embedded import EmbeddedRegistry
from ._etcd import (
    DEFAULT_PREFIX,
    PASSWORD_ENV,
    BadRecord,
    EtcdClient,
    EtcdError,
    KeyValue,
    Listing,
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
from ._etcd_options import EtcdOptions

__all__ = [
    "DEFAULT_PREFIX",
    "PASSWORD_ENV",
    "BadRecord",
    "EmbeddedRegistry",
    "EtcdClient",
    "EtcdError",
    "EtcdOptions",
    "KeyValue",
    "Listing",
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
