"""The request's output constraint: `response_format` or a vLLM `guided_*` field, as the engine's
StructuredOutputs, with the parameter a 400 about it names.

OpenAI's `response_format`: "text" (free), "json_object" (any JSON object) and "json_schema" (the
schema, enforced whatever `strict` says; a missing schema is any object). vLLM's extras:
`guided_json` (a schema, as an object or its JSON text), `guided_regex`, `guided_choice` and
`guided_grammar` (GBNF when it has a `::=` rule, else llguidance's Lark). At most one of them.
"""

from __future__ import annotations

import json
import re

from tokenmill.sampling_params import StructuredOutputs
from tokenmill.server.errors import invalid_request

JSON_OBJECT = {"type": "object"}
_GBNF_RULE = re.compile(r"^\s*[A-Za-z][\w-]*\s*::=", re.MULTILINE)


def requested_constraint(req) -> tuple[StructuredOutputs | None, str | None]:
    """(the constraint, the parameter it came from), or (None, None) for free output; a 400 when
    more than one is given or one is malformed before any compiling."""
    found: list[tuple[StructuredOutputs, str]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            found.append((StructuredOutputs.json_schema(JSON_OBJECT), "response_format"))
        else:
            if fmt.json_schema is None:
                raise invalid_request("response_format of type 'json_schema' needs a "
                                      "'json_schema' object", "response_format.json_schema",
                                      "invalid_value")
            schema = fmt.json_schema.schema_
            found.append((StructuredOutputs.json_schema(JSON_OBJECT if schema is None else schema),
                          "response_format"))
    if req.guided_json is not None:
        found.append((StructuredOutputs.json_schema(_schema(req.guided_json)), "guided_json"))
    if req.guided_regex is not None:
        found.append((StructuredOutputs("regex", req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        if any(c == "" for c in req.guided_choice):
            raise invalid_request("guided_choice entries must be non-empty", "guided_choice",
                                  "invalid_value")
        found.append((StructuredOutputs.choice(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        kind = "gbnf" if _GBNF_RULE.search(req.guided_grammar) else "lark"
        found.append((StructuredOutputs(kind, req.guided_grammar), "guided_grammar"))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(param for _, param in found)
        raise invalid_request(f"Only one output constraint may be given; got {names}",
                              found[1][1], "invalid_value")
    return found[0]


def _schema(value: dict | str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except json.JSONDecodeError as exc:
        raise invalid_request(f"guided_json is not valid JSON: {exc}", "guided_json",
                              "invalid_value") from None
    if not isinstance(schema, dict):
        raise invalid_request("guided_json must be a JSON Schema object", "guided_json",
                              "invalid_value")
    return schema
