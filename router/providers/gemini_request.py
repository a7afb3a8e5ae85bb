"""The chat-completions request written as Gemini's `generateContent` body: messages become
`contents` and `systemInstruction`, sampling parameters `generationConfig`, tools
`functionDeclarations` and `toolConfig`.

A parameter Gemini has no equivalent for is refused (Unsupported, a 400 naming it) or, with
the provider's `drop_unsupported`, left out. Content the API cannot take (an unknown content
part, an image URL whose media type cannot be told) is always a 400: it is never dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from router.errors import BadRequest
from router.providers.translated import THOUGHT, Unsupported

API = "Gemini"
# A tool call id made from a Gemini function call that carried a thought signature ends with
# THOUGHT and the signature: the client sends the id back with the call, and the signature
# returns to Gemini with it (Gemini 3 refuses a conversation whose function calls lost theirs).
# Parameters that change nothing in the answer: not sent, never refused.
_IGNORED = frozenset({"model", "stream", "stream_options", "user", "metadata", "store",
                      "service_tier", "prompt_cache_key", "safety_identifier"})
# reasoning_effort -> thinkingBudget (tokens), as Google's own OpenAI-compatible endpoint does.
_THINKING_BUDGET = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}
_TOOL_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY"}
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[^;,]*)*),(.*)", re.DOTALL)
# A URL's media type by its name's extension: what Gemini reads by URL.
_MEDIA_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp",
    "heic": "image/heic", "heif": "image/heif", "gif": "image/gif", "pdf": "application/pdf",
    "mp3": "audio/mp3", "wav": "audio/wav", "ogg": "audio/ogg", "flac": "audio/flac",
    "aac": "audio/aac", "mp4": "video/mp4", "mov": "video/mov", "webm": "video/webm",
}
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}

Refuse = Callable[[str], None]


def gemini_body(body: Mapping[str, Any], drop_unsupported: bool) -> dict[str, Any]:
    """The `generateContent` body for a chat-completions request (the URL carries the model
    and whether it streams)."""

    def refuse(param: str) -> None:
        if not drop_unsupported:
            raise Unsupported(param, API)

    native: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for key, value in body.items():
        if value is None or key in _IGNORED:
            continue
        match key:
            case "messages":
                contents, system = _contents(value)
                native["contents"] = contents
                if system:
                    native["systemInstruction"] = {"parts": system}
            case "temperature":
                config["temperature"] = value
            case "top_p":
                config["topP"] = value
            case "top_k":
                config["topK"] = value
            case "max_tokens":
                config.setdefault("maxOutputTokens", value)
            case "max_completion_tokens":
                config["maxOutputTokens"] = value  # the newer name wins over max_tokens
            case "stop":
                config["stopSequences"] = [value] if isinstance(value, str) else list(value)
            case "n":
                if value != 1:
                    config["candidateCount"] = value
            case "seed":
                config["seed"] = value
            case "presence_penalty":
                config["presencePenalty"] = value
            case "frequency_penalty":
                config["frequencyPenalty"] = value
            case "response_format":
                _response_format(value, config, refuse)
            case "reasoning_effort":
                budget = _THINKING_BUDGET.get(value) if isinstance(value, str) else None
                if budget is None:
                    raise BadRequest(f"reasoning_effort: {value!r} is not one of "
                                     f"{', '.join(_THINKING_BUDGET)}")
                config["thinkingConfig"] = {"thinkingBudget": budget}
            case "tools":
                if value:
                    native["tools"] = [{"functionDeclarations": [_declaration(tool)
                                                                 for tool in value]}]
            case "tool_choice":
                calling = _tool_choice(value, refuse)
                if calling is not None:
                    native["toolConfig"] = {"functionCallingConfig": calling}
            case "parallel_tool_calls":
                if value is False:  # Gemini may always call several functions at once
                    refuse(key)
            case "logprobs":
                if value:
                    refuse(key)
            case "modalities":
                if value != ["text"]:
                    refuse(key)
            case _:
                refuse(key)
    if "toolConfig" in native and "tools" not in native:
        del native["toolConfig"]  # OpenAI accepts a tool_choice without tools; Gemini not
    if config:
        native["generationConfig"] = config
    return native


def _response_format(value: Any, config: dict[str, Any], refuse: Refuse) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        config["responseMimeType"] = "application/json"
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is not None:
            # JSON Schema as the client wrote it: `responseSchema` takes only Gemini's
            # OpenAPI subset, which many client schemas overstep.
            config["responseJsonSchema"] = schema
    else:
        refuse("response_format")


def _declaration(tool: Mapping[str, Any]) -> dict[str, Any]:
    function = tool["function"]  # validated: type "function" with a name
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("parameters") is not None:
        # Any JSON Schema, as OpenAI takes it (`parameters` would take only Gemini's subset).
        out["parametersJsonSchema"] = function["parameters"]
    return out


def _tool_choice(value: Any, refuse: Refuse) -> dict[str, Any] | None:
    if isinstance(value, str):
        return {"mode": _TOOL_MODES[value]}  # validated: none, auto or required
    kind = value.get("type")
    if kind == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise BadRequest("tool_choice.function.name: a function name is required")
        return {"mode": "ANY", "allowedFunctionNames": [name]}
    if kind == "allowed_tools":
        allowed = value.get("allowed_tools")
        tools = allowed.get("tools") if isinstance(allowed, dict) else None
        if not isinstance(tools, list):
            raise BadRequest("tool_choice.allowed_tools.tools: a list of tools is required")
        names = [tool["function"]["name"] for tool in tools
                 if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
                 and isinstance(tool["function"].get("name"), str)]
        # "auto" among some tools is Gemini's VALIDATED: a function call or text, and any call
        # one of the allowed functions.
        mode = "ANY" if allowed.get("mode") == "required" else "VALIDATED"
        return {"mode": mode, "allowedFunctionNames": names}
    refuse("tool_choice")
    return None


def _contents(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """(contents, the systemInstruction's parts). System and developer messages, wherever
    they are, go to the one systemInstruction; consecutive tool results make one turn."""
    contents: list[dict[str, Any]] = []
    system: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}  # tool call id -> function name, for the results
    results: dict[str, Any] | None = None  # the turn of the tool results being gathered
    for i, message in enumerate(messages):
        role, content, where = message["role"], message.get("content"), f"messages[{i}]"
        if role in ("tool", "function"):
            part = {"functionResponse": _function_response(message, call_names, where)}
            if results is None:
                results = {"role": "user", "parts": []}
                contents.append(results)
            results["parts"].append(part)
            continue
        results = None
        if role in ("system", "developer"):
            system.extend(_text_parts(content, where))
        elif role == "user":
            parts = _user_parts(content, where)
            if parts:
                contents.append({"role": "user", "parts": parts})
        else:  # assistant
            parts = _text_parts(content, where)
            for j, call in enumerate(message.get("tool_calls") or ()):
                parts.append(_function_call(call, f"{where}.tool_calls[{j}]", call_names))
            if parts:
                contents.append({"role": "model", "parts": parts})
    return contents, system


def _text_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts = []
    for j, part in enumerate(content or ()):
        kind = part.get("type")
        text = part.get("text") if kind == "text" else \
            part.get("refusal") if kind == "refusal" else None
        if not isinstance(text, str):
            raise BadRequest(f"{where}.content[{j}]: only text parts are taken here")
        if text:
            parts.append({"text": text})
    return parts


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str) or content is None:
        return _text_parts(content, where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type")
        if kind == "text":
            parts.extend(_text_parts([part], where))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise BadRequest(f"{at}.image_url.url: a URL is required")
            parts.append(_media(url, f"{at}.image_url.url"))
        elif kind == "input_audio":
            audio = part.get("input_audio")
            audio = audio if isinstance(audio, dict) else {}
            mime = _AUDIO_TYPES.get(str(audio.get("format")))
            if mime is None or not isinstance(audio.get("data"), str):
                raise BadRequest(f"{at}.input_audio: base64 `data` and a `format` of wav or "
                                 "mp3 are required")
            parts.append({"inlineData": {"mimeType": mime, "data": audio["data"]}})
        elif kind == "file":
            file = part.get("file")
            data = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data, str) or not data.startswith("data:"):
                raise BadRequest(f"{at}.file: only `file_data` (a data URL) can go to the "
                                 f"{API} API; an OpenAI file id means nothing there")
            parts.append(_media(data, f"{at}.file.file_data"))
        else:
            raise BadRequest(f"{at}: content parts of type {kind!r} cannot go to the {API} API")
    return parts


def _media(url: str, where: str) -> dict[str, Any]:
    """A data URL -> inlineData; an http(s) URL -> fileData, its media type told by its name."""
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None or ";base64" not in match.group(2):
            raise BadRequest(f"{where}: a data URL must be `data:<media type>;base64,<data>`")
        return {"inlineData": {"mimeType": match.group(1), "data": match.group(3)}}
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise BadRequest(f"{where}: only data URLs and http(s) URLs can go to the {API} API")
    ext = parts.path.rpartition(".")[2].lower() if "." in parts.path.rpartition("/")[2] else ""
    mime = _MEDIA_TYPES.get(ext)
    if mime is None:
        raise BadRequest(f"{where}: the {API} API needs the media type of a file it reads by "
                         "URL, and this URL's name does not tell it (.png, .jpg, .webp, "
                         "...); send the image as a data URL instead")
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _function_call(call: Any, where: str, call_names: dict[str, str]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.function.name: a function name is required")
    raw = function.get("arguments") if isinstance(function, dict) else None
    args = _json(raw) if isinstance(raw, str) and raw.strip() else {}
    if not isinstance(args, dict):
        raise BadRequest(f"{where}.function.arguments: a JSON object is required")
    part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
    call_id = call.get("id")
    if isinstance(call_id, str):
        call_names[call_id] = name
        signature = call_id.partition(THOUGHT)[2]
        if signature:
            part["thoughtSignature"] = signature
    return part


def _function_response(message: Mapping[str, Any], call_names: Mapping[str, str],
                       where: str) -> dict[str, Any]:
    if message["role"] == "function":  # the legacy function role names its function
        name = message.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{where}.name: the function's name is required")
    else:
        call_id = message.get("tool_call_id")
        found = call_names.get(call_id) if isinstance(call_id, str) else None
        if found is None:
            raise BadRequest(f"{where}.tool_call_id: no earlier assistant message has a tool "
                             f"call with the id {call_id!r} (Gemini needs the function's name)")
        name = found
    content = message.get("content")
    text = content if isinstance(content, str) else \
        "".join(p["text"] for p in _text_parts(content, where))
    parsed = _json(text)
    return {"name": name, "response": parsed if isinstance(parsed, dict) else {"content": text}}


def _json(text: str) -> Any:
    """A JSON text's value, or None when it is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)  # integers past 64 bits, which orjson refuses
    except ValueError:
        return None
