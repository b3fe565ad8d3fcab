"""Write tests/fuzz/openai-openapi.yaml: the official OpenAI OpenAPI spec trimmed to what
`interlock serve` serves, with the error responses it answers.

Usage: python tests/fuzz/trim_openapi.py PATH/TO/openai-openapi/openapi.yaml

The source is https://github.com/openai/openai-openapi (MIT, see LICENSE-openai-openapi beside
the output). What changes besides the trimming is listed in tests/fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

#: (path, method) interlock serves.
OPERATIONS = [
    ("/chat/completions", "post"),
    ("/completions", "post"),
    ("/models", "get"),
    ("/models/{model}", "get"),
]
#: Statuses interlock answers with an OpenAI-style error body, besides the spec's own.
ERRORS = {
    "400": "Invalid request (a field is wrong, unknown or unsupported).",
    "404": "Unknown model or path.",
    "408": "The request body did not arrive in time.",
    "413": "The request body is too large.",
    "431": "The request headers are too large.",
    "503": "No worker can take the request now.",
}


def _refs(node: Any, found: set[tuple[str, str]]) -> None:
    """Add the components ``node`` refers to, as (kind, name): ("schemas", "Error")."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/"):
            kind, name = ref.removeprefix("#/components/").split("/", 1)
            found.add((kind, name))
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def trim(spec: dict[str, Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, method in OPERATIONS:
        operation = dict(spec["paths"][path][method])
        operation.pop("x-oaiMeta", None)
        responses = dict(operation["responses"])
        for status, description in ERRORS.items():
            responses.setdefault(
                status,
                {
                    "description": description,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                        }
                    },
                },
            )
        operation["responses"] = responses
        paths.setdefault(path, {})[method] = operation
    components = spec["components"]
    schemas = components["schemas"]
    # The one model interlock's fuzz server serves, so valid requests get past the model check.
    schemas = {**schemas, "ModelIdsShared": {"type": "string", "enum": ["mock"]}}
    completion = schemas["CreateCompletionRequest"]
    completion = {
        **completion,
        "properties": {**completion["properties"], "model": {"type": "string", "enum": ["mock"]}},
    }
    schemas["CreateCompletionRequest"] = completion
    components = {**components, "schemas": schemas}
    wanted: set[tuple[str, str]] = {("schemas", "ErrorResponse")}
    _refs(paths, wanted)
    done: set[tuple[str, str]] = set()
    while wanted - done:
        kind, name = (wanted - done).pop()
        done.add((kind, name))
        _refs(components[kind][name], wanted)
    kept: dict[str, dict[str, Any]] = {}
    for kind, name in sorted(done):
        kept.setdefault(kind, {})[name] = components[kind][name]
    return {
        "openapi": spec["openapi"],
        "info": {
            **spec["info"],
            "title": spec["info"]["title"] + " (trimmed to what interlock serves)",
        },
        "servers": [{"url": "http://127.0.0.1/v1"}],
        "paths": paths,
        "components": kept,
    }


def main() -> None:
    source = Path(sys.argv[1])
    spec = yaml.safe_load(source.read_text())
    out = Path(__file__).with_name("openai-openapi.yaml")
    out.write_text(yaml.safe_dump(trim(spec), sort_keys=False, allow_unicode=True, width=100))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
