"""The official Node SDK (`openai` on npm) as the client: a JavaScript application reads the
router's answers, streams and errors as it reads OpenAI's. Skipped, saying why, without node or
the package (`make test` installs it into .venv/node)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import KEY, openai_provider, router_config

NODE_DIR = Path(__file__).resolve().parents[2] / ".venv" / "node"

SCRIPT = r"""
import OpenAI from "openai";
const [url, key] = process.argv.slice(2);
const client = new OpenAI({ baseURL: url, apiKey: key, maxRetries: 0 });
const out = {};
const messages = [{ role: "user", content: "hello there" }];
const reply = await client.chat.completions.create({ model: "m", messages });
out.text = reply.choices[0].message.content;
out.finish = reply.choices[0].finish_reason;
out.usage = reply.usage.completion_tokens;
let streamed = "";
for await (const chunk of await client.chat.completions.create({ model: "m", messages,
                                                                 stream: true })) {
  streamed += chunk.choices[0]?.delta?.content ?? "";
}
out.streamed = streamed;
try {
  const bad = [{ role: "wizard", content: "x" }];
  await client.chat.completions.create({ model: "m", messages: bad });
} catch (err) {
  out.error = { status: err.status, message: err.message, code: err.code, param: err.param };
}
const vectors = await client.embeddings.create({ model: "e", input: ["a", "b"],
                                                 encoding_format: "float" });
out.vectors = vectors.data.length;
out.model = (await client.models.retrieve("m")).id;
console.log(JSON.stringify(out));
"""


async def test_the_node_sdk_reads_answers_streams_and_errors(fakes, start_router):
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "openai").is_dir():
        pytest.skip("node or the openai npm package is missing (make test installs the "
                    "package when node and npm are present)")
    up = await fakes("up")
    r = await start_router(router_config(
        {"up": openai_provider(up, probe=False)},
        {"m": {"backends": [{"provider": "up", "model": "chunks:3"}]},
         "e": {"backends": [{"provider": "up", "model": "embed-x"}]}}))
    script = NODE_DIR / f"check-{id(r)}.mjs"  # beside node_modules: `import "openai"` resolves
    script.write_text(SCRIPT)
    try:
        proc = await asyncio.create_subprocess_exec(
            node, str(script), f"{r.url}/v1", KEY, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        script.unlink()
    assert proc.returncode == 0, err.decode()[-2000:]
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["text"] == "tok0 tok1 tok2 " and seen["finish"] == "stop" and seen["usage"] == 3
    assert seen["streamed"] == "tok0 tok1 tok2 "
    error = seen["error"]
    assert error["status"] == 422 and error["code"] == "validation_error"
    assert error["param"] == "messages.0.role"
    assert "messages.0.role: " in error["message"]
    assert seen["vectors"] == 2 and seen["model"] == "m"
