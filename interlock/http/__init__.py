"""The OpenAI-compatible HTTP frontend: Starlette on Hypercorn's trio worker.

- `build_app` (a running `Pipeline` -> Starlette app), `serve_http` (serve it in this trio run).
- `Preprocessor` (tokenizer + chat template), `HttpMetrics` (Prometheus, a transition sink),
  `HttpLimits` (body size, context length).
- `ApiKeys`: the keys clients must send, and the trusted ones that may use the privileges.
- `ModelRewrites`: GAIE's InferenceModelRewrite rules (``[[model_rewrites]]``), for `build_app`.
- `Drain` (``app.state.drain``): stop gracefully, as ``interlock serve`` does on SIGTERM.
- `add_serve_parser` / `add_route_parser`: the ``interlock serve`` and ``interlock route``
  commands.

docs/http.md and docs/route-api.md are the reference.
"""

from .._model_rewrites import ModelRewrites
from ._app import HttpLimits, build_app
from ._auth import ApiKeys
from ._cli import add_route_parser, add_serve_parser
from ._drain import Drain
from ._errors import HttpError
from ._metrics import HttpMetrics
from ._preprocess import Preprocessor
from ._serve import serve_http

__all__ = [
    "ApiKeys",
    "Drain",
    "HttpError",
    "HttpLimits",
    "HttpMetrics",
    "ModelRewrites",
    "Preprocessor",
    "add_route_parser",
    "add_serve_parser",
    "build_app",
    "serve_http",
]
