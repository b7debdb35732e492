"""A chat request's tools: their checks, what `tool_choice` asks of the output, and the
conversation in the shape the model's chat template (or the server's tool description) wants.

Rules (OpenAI's, and the ones this server picks):
- `tool_choice` defaults to "auto" with tools; "required" or a named function without tools is
  a 400 ("none" and "auto" are accepted, as before tools were served); a named
  function must be among the tools; names follow ^[a-zA-Z0-9_-]{1,64}$ and are unique; a
  function's `parameters` must be an object schema (a schema that does not compile is a 400 when
  the grammar is compiled).
- "none": no grammar, no parsing; the tools are still shown to a model whose template renders
  them. "auto": a grammar allowing plain text or well-formed calls (so a streamed call is never
  one that turns out malformed), parsed. "required" / named: a grammar forcing one call (or one
  or more with `parallel_tool_calls`), parsed.
- An output constraint (response_format, guided_*) with "required" or a named function is a 400:
  both would constrain the same output. With "auto" the constraint wins: the reply is in the
  requested format, never a call, and is not parsed.
"""

from __future__ import annotations

import json

from tokenmill.sampling_params import StructuredOutputs
from tokenmill.server.errors import invalid_request
from tokenmill.server.protocol import ChatCompletionRequest, NamedToolChoice
from tokenmill.server.structured import requested_constraint
from tokenmill.server.tool_formats import (NAME_PATTERN, ToolFormat, arguments_object,
                                           instructions, mistral_call_id)


def check_tools(req: ChatCompletionRequest) -> None:
    """400s for tools and tool_choice that cannot be served, before anything is queued."""
    if req.tools is None or not req.tools:
        if forces_call(req):  # "none" and "auto" mean nothing without tools: accepted
            raise invalid_request("'tool_choice' is only allowed when 'tools' are specified.",
                                  "tool_choice", "invalid_value")
        return
    names = set()
    for i, tool in enumerate(req.tools):
        fn = tool.function
        if not NAME_PATTERN.match(fn.name):
            raise invalid_request(f"Invalid 'tools[{i}].function.name': {fn.name!r} must match "
                                  "^[a-zA-Z0-9_-]{1,64}$.", "tools", "invalid_value")
        if fn.name in names:
            raise invalid_request(f"Duplicate function name in 'tools': {fn.name!r}.", "tools",
                                  "invalid_value")
        names.add(fn.name)
        schema_type = (fn.parameters or {}).get("type", "object")
        if schema_type != "object":
            raise invalid_request(f"Invalid 'tools[{i}].function.parameters': the schema must "
                                  f"describe an object, not {schema_type!r}.", "tools",
                                  "invalid_value")
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise invalid_request(f"Invalid 'tool_choice': no function named "
                              f"{choice.function.name!r} in 'tools'.", "tool_choice",
                              "invalid_value")
    _, constraint_param = requested_constraint(req)
    if constraint_param is not None and forces_call(req):
        raise invalid_request(f"'{constraint_param}' cannot be combined with a tool_choice that "
                              "forces a call: both would constrain the output.",
                              constraint_param, "invalid_value")


def forces_call(req: ChatCompletionRequest) -> bool:
    return req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)


def parses_calls(req: ChatCompletionRequest) -> bool:
    """Whether the reply may hold calls (and is parsed for them)."""
    if not req.tools or req.tool_choice == "none":
        return False
    return forces_call(req) or requested_constraint(req)[0] is None


def tool_grammar(fmt: ToolFormat, req: ChatCompletionRequest,
                 tokenizer) -> StructuredOutputs | None:
    """The Lark grammar the reply is held to, or None (see the module docstring)."""
    if not parses_calls(req):
        return None
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, NamedToolChoice):
        functions = [f for f in functions if f["name"] == req.tool_choice.function.name]
    grammar = fmt.grammar(functions, parallel=req.parallel_tool_calls,
                          allow_text=not forces_call(req), tokenizer=tokenizer)
    return StructuredOutputs("lark", grammar)


def tool_dicts(req: ChatCompletionRequest) -> list[dict] | None:
    if not req.tools:
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def template_messages(req: ChatCompletionRequest, fmt: ToolFormat,
                      native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for the chat template. `native`: the template renders tools, tool
    calls (with `function.arguments` a dict, as Hugging Face templates expect) and `tool`
    messages itself; else calls are written into the assistant's text in `fmt`, results become
    user messages and the tools are described in the system message (unless tool_choice is
    "none")."""
    tools = tool_dicts(req)
    names = {}  # call id -> function name, for the results of non-native templates
    messages: list[dict] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": m.text() if m.content is not None else None}
        if m.tool_calls:
            names.update((c.id, c.function.name) for c in m.tool_calls)
            if native:
                message["tool_calls"] = [
                    {"id": _call_id(fmt, c.id), "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": arguments_object(c.function.arguments)}}
                    for c in m.tool_calls]
            else:
                calls = fmt.calls_text([(c.function.name, c.function.arguments)
                                        for c in m.tool_calls])
                message["content"] = "\n".join(x for x in (message["content"], calls) if x)
        elif role == "tool" and (native or tools):  # (without tools: passed as they are)
            if native:
                message["tool_call_id"] = _call_id(fmt, m.tool_call_id or "")
            else:
                name = names.get(m.tool_call_id, m.name or "a function")
                result = f"Result of {name} (call {m.tool_call_id}):\n{message['content']}"
                if messages and messages[-1].get("tool_result"):
                    messages[-1]["content"] += "\n\n" + result  # one user turn for a run
                    continue
                message = {"role": "user", "content": result, "tool_result": True}
        if message["content"] is None and "tool_calls" not in message:
            message["content"] = ""  # templates concatenate content: text, never None
        messages.append(message)
    for message in messages:
        message.pop("tool_result", None)
    if native or not tools:
        return messages, tools if native else None
    if req.tool_choice != "none":
        described = instructions(fmt, tools)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{described}"}
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages, None


def _call_id(fmt: ToolFormat, call_id: str) -> str:
    return mistral_call_id(call_id) if fmt.name == "mistral" else call_id


def tools_bytes(req: ChatCompletionRequest) -> int:
    """The tool list's JSON length: a bound of its prompt tokens' share (admission)."""
    return len(json.dumps(tool_dicts(req) or [], ensure_ascii=False).encode("utf-8"))
