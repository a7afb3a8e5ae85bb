"""An OpenAI chat-completions request written as an Anthropic Messages API request body.

What the Messages API has no equivalent for is refused with a 400 naming it (`Unsupported`), or
left out when the provider says `drop_unsupported`; a parameter set to its neutral value (`n: 1`,
a penalty of 0, ...) changes nothing and is accepted as is. docs/providers.md has the table.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from router.errors import BadRequest
from router.providers.translated import Unsupported, plain_call_id

API = "Anthropic"

TRANSLATED = frozenset({"model", "messages", "max_completion_tokens", "max_tokens", "stop",
                        "temperature", "top_p", "top_k", "tools", "tool_choice",
                        "parallel_tool_calls", "user", "response_format", "reasoning_effort"})
# Parameters whose value here means "the default": accepted, nothing to send.
NEUTRAL: dict[str, Any] = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0,
                           "logprobs": False, "top_logprobs": 0, "logit_bias": {}}
# The router's own business (it always asks for a stream's usage) and OpenAI's stored-completion
# bookkeeping: they change nothing in the answer.
IGNORED = frozenset({"stream", "stream_options", "store", "metadata"})
# OpenAI's reasoning_effort values that Anthropic's output_config.effort takes as they are.
EFFORTS = frozenset({"low", "medium", "high", "xhigh"})
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[^,;]*)*?);base64,(.*)", re.DOTALL)


class _Writer:
    """One request being written: refuses, or drops, what cannot be said."""

    __slots__ = ("drop",)

    def __init__(self, drop: bool) -> None:
        self.drop = drop

    def unsupported(self, param: str, why: str = "") -> None:
        """Raises Unsupported unless the provider drops such parameters (then the caller
        leaves it out)."""
        if not self.drop:
            raise Unsupported(param, API, why)


def messages_body(body: dict[str, Any], *, stream: bool, default_max_tokens: int,
                  drop_unsupported: bool) -> dict[str, Any]:
    """The Messages API request for a chat-completions `body` (as validated by the router's
    schema: the top-level shapes are checked, the contents of messages are not)."""
    w = _Writer(drop_unsupported)
    out: dict[str, Any] = {"model": body.get("model")}
    system, messages = _conversation(body["messages"], w)
    if system:
        out["system"] = system[0] if len(system) == 1 else \
            [{"type": "text", "text": text} for text in system]
    out["messages"] = messages
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    out["max_tokens"] = default_max_tokens if limit is None else _whole(limit)
    stop = body.get("stop")
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    for name in ("temperature", "top_p", "top_k"):  # top_k: an extension Anthropic has too
        if body.get(name) is not None:
            out[name] = body[name]
    _tools(body, out, w)
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise BadRequest("`user` must be a string")
        if user:
            out["metadata"] = {"user_id": user}
    _output_config(body, out, w)
    if stream:
        out["stream"] = True
    for name, value in body.items():
        if value is None or name in TRANSLATED or name in IGNORED:
            continue
        if name in NEUTRAL and _same(value, NEUTRAL[name]):
            continue
        w.unsupported(name)
    return out


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool):
        return value is neutral
    return not isinstance(value, bool) and value == neutral


def _whole(value: Any) -> Any:
    """54.0 -> 54 (the router's schema accepts a whole float where an integer goes)."""
    return int(value) if type(value) is float and value.is_integer() else value


def _tools(body: dict[str, Any], out: dict[str, Any], w: _Writer) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls`; without tools the other two have
    nothing to choose among and are left out."""
    tools = body.get("tools")
    if not tools:
        return
    out["tools"] = [_tool(tool) for tool in tools]
    choice: dict[str, Any] | None = None
    given = body.get("tool_choice")
    if given in ("auto", "none"):
        choice = {"type": given}
    elif given == "required":
        choice = {"type": "any"}
    elif isinstance(given, dict):
        function = given.get("function")
        if given.get("type") == "function" and isinstance(function, dict) \
                and isinstance(function.get("name"), str):
            choice = {"type": "tool", "name": function["name"]}
        else:
            w.unsupported("tool_choice", f" (type {given.get('type')!r})")
    if body.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]  # validated: {name, description?, parameters?, ...}
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    out["input_schema"] = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is True:
        out["strict"] = True
    return out


def _output_config(body: dict[str, Any], out: dict[str, Any], w: _Writer) -> None:
    """`response_format` (a JSON schema) and `reasoning_effort`: Anthropic's output_config."""
    config: dict[str, Any] = {}
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise BadRequest("`response_format.json_schema.schema` must be a JSON schema object")
        config["format"] = {"type": "json_schema", "schema": spec["schema"]}
    elif fmt is not None and fmt != {"type": "text"}:
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        w.unsupported("response_format", f" (type {kind!r}; a json_schema is)")
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in EFFORTS:
        config["effort"] = effort
    elif effort is not None:
        w.unsupported("reasoning_effort", f" (value {effort!r}; low, medium, high or xhigh are)")
    if config:
        out["output_config"] = config


def _conversation(messages: list[dict[str, Any]], w: _Writer
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """The system texts, and the turns: consecutive turns of one role merged into one (the
    Messages API wants user and assistant to alternate), turns left empty dropped."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message["role"]
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.extend(t for t in _texts(message.get("content"), where, w) if t)
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where, w)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where, w)
        elif role == "tool":
            blocks = [_tool_result(message, where, w)]
            role = "user"
        else:  # the deprecated `function` role
            w.unsupported(f"{where}.role", f" (role {role!r}; use tool messages)")
            continue
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _texts(content: Any, where: str, w: _Writer) -> list[str]:
    """A content that may only hold text (a system, developer or tool message's)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(_text_of(part, f"{where}.content[{j}]"))
        else:
            w.unsupported(f"{where}.content[{j}]", f" (a {kind!r} part where only text goes)")
    return texts


def _text_of(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise BadRequest(f"`{where}.text` must be a string")
    return text


def _user_blocks(content: Any, where: str, w: _Writer) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            text = _text_of(part, at)
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image(part.get("image_url"), at))
        elif kind == "file":
            block = _document(part.get("file"), at, w)
            if block is not None:
                blocks.append(block)
        else:
            w.unsupported(at, f" (a {kind!r} part)")
    return blocks


def _image(image: Any, where: str) -> dict[str, Any]:
    """`image_url` ({url, detail} or the bare URL): a data URL's bytes go as base64, an http(s)
    URL as a URL source that Anthropic fetches. `detail` has no equivalent: left out."""
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise BadRequest(f"`{where}.image_url.url` must be a string")
    if url.startswith("data:"):
        media_type, data = _data_url(url, f"{where}.image_url.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type,
                                            "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest(f"`{where}.image_url.url` must be an http(s) URL or a base64 data URL")


def _document(file: Any, where: str, w: _Writer) -> dict[str, Any] | None:
    """A `file` part given inline as a PDF data URL: a document block."""
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str):
        w.unsupported(where, " (a file part by file_id: give file_data, a PDF data URL)")
        return None
    media_type, data = _data_url(data_url, f"{where}.file.file_data")
    if media_type != "application/pdf":
        w.unsupported(where, f" (a {media_type} file; PDF is)")
        return None
    return {"type": "document", "source": {"type": "base64", "media_type": media_type,
                                           "data": data}}


def _data_url(url: str, where: str) -> tuple[str, str]:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise BadRequest(f"`{where}` must be a base64 data URL (data:TYPE;base64,...)")
    return match.group(1).lower(), match.group(3)


def _assistant_blocks(message: dict[str, Any], where: str, w: _Writer
                      ) -> list[dict[str, Any]]:
    """Text (a `refusal` part is what the assistant said, too), then its tool calls as
    tool_use blocks whose input is the parsed arguments."""
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif content is not None:
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type")
            if kind in ("text", "refusal"):
                text = part.get(kind)
                if not isinstance(text, str):
                    raise BadRequest(f"`{at}.{kind}` must be a string")
                if text:
                    blocks.append({"type": "text", "text": text})
            else:
                w.unsupported(at, f" (a {kind!r} part in an assistant message)")
    if message.get("function_call") is not None:
        w.unsupported(f"{where}.function_call", " (use tool_calls)")
    for k, call in enumerate(message.get("tool_calls") or ()):
        blocks.append(_tool_use(call, f"{where}.tool_calls[{k}]"))
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
            or not isinstance(function.get("name"), str):
        raise BadRequest(f"`{where}` must be {{id, type: function, function: {{name, "
                         "arguments}}}}")
    arguments = function.get("arguments") or "{}"
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise BadRequest(f"`{where}.function.arguments` must be a JSON object (as a string): "
                         "Anthropic takes a tool call's input as an object")
    return {"type": "tool_use", "id": plain_call_id(call["id"]), "name": function["name"],
            "input": parsed}


def _tool_result(message: dict[str, Any], where: str, w: _Writer) -> dict[str, Any]:
    tool_call_id = message.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise BadRequest(f"`{where}.tool_call_id` is required in a tool message")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": plain_call_id(tool_call_id)}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content:
        texts = [t for t in _texts(content, where, w) if t]
        if texts:
            block["content"] = [{"type": "text", "text": t} for t in texts]
    return block
