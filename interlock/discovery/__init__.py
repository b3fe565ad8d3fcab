"""Worker membership: where workers are found (embedded registry; etcd later)."""

from ._embedded import EmbeddedRegistry

__all__ = ["EmbeddedRegistry"]
