"""The HTTP bridge as real clients see it (run by tests/it/http.rs).

    python3 tests/http/check_clients.py BASE_URL MODEL

- the official `openai` client streams a chat completion, gets one whole,
  completes text and lists models;
- Ollama's /api/chat and /api/generate NDJSON streams carry the fields
  Ollama's API document lists, with their types;
- /metrics parses with prometheus_client's text-format parser and holds the
  families the daemon promises.
Exits non-zero with a message on the first mismatch.
"""

import datetime
import json
import math
import sys
import urllib.error
import urllib.request

import jsonschema
import openai
from prometheus_client.parser import text_string_to_metric_families

BASE, MODEL = sys.argv[1], sys.argv[2]


def check(cond, what):
    if not cond:
        sys.exit(f"check_clients: {what}")


def post_lines(path, body):
    req = urllib.request.Request(BASE + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        check(r.headers["Content-Type"] == "application/x-ndjson",
              f"{path}: content type {r.headers['Content-Type']}")
        return [json.loads(line) for line in r.read().decode().splitlines() if line]


def rfc3339(s):
    # Python before 3.11 takes at most microseconds: trim nanoseconds.
    head, _, frac = s.rstrip("Z").partition(".")
    return datetime.datetime.fromisoformat(head + "." + frac[:6] + "+00:00")


client = openai.OpenAI(base_url=BASE + "/v1", api_key="not-needed")

# Chat completion, streamed, with usage at the end.
stream = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Say something."}],
    max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True})
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
check(len(pieces) >= 1, "the stream brought no text")
check(finish == "length", f"finish_reason {finish!r} after max_tokens")
check(usage is not None and usage.completion_tokens == 8, f"usage {usage}")
streamed = "".join(pieces)

# The same request whole: greedy, so the same text.
whole = client.chat.completions.create(
    model=MODEL,
    messages=[{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Say something."}],
    max_tokens=8, temperature=0)
check(whole.choices[0].message.role == "assistant", "role")
check(whole.choices[0].message.content == streamed,
      f"whole {whole.choices[0].message.content!r} != streamed {streamed!r}")
check(whole.usage.prompt_tokens > 0 and whole.usage.total_tokens
      == whole.usage.prompt_tokens + whole.usage.completion_tokens, f"usage {whole.usage}")

# Log-probabilities and penalties, whole and streamed.
scored = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
    max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
    presence_penalty=0.5, frequency_penalty=0.25)
content = scored.choices[0].logprobs.content
check(len(content) == 4, f"logprobs for 4 tokens: {content}")
for c in content:
    check(len(c.top_logprobs) == 3 and c.logprob <= 0, f"logprob entry {c}")
    mass = sum(math.exp(t.logprob) for t in c.top_logprobs)
    check(mass <= 1 + 1e-5, f"top-3 mass {mass}")
    check([t.logprob for t in c.top_logprobs] == sorted([t.logprob for t in c.top_logprobs],
                                                        reverse=True), "most likely first")
    check(bytes(c.bytes).decode(errors="replace") == c.token or c.token == "\ufffd",
          f"bytes and token agree: {c}")
entries = 0
for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True):
    for choice in chunk.choices:
        if choice.logprobs and choice.logprobs.content:
            entries += len(choice.logprobs.content)
check(entries == 4, f"streamed logprobs for {entries} of 4 tokens")

text = client.completions.create(model=MODEL, prompt="The capital of France is",
                                 max_tokens=4, temperature=0)
check(text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4,
      f"completion {text}")

# Constrained output: even this random-weights model writes valid JSON.
schema = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 10},
    "score": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2},
    "ok": {"type": "boolean"}}, "required": ["title", "score", "tags", "ok"]}
for seed in range(3):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A record, please."}],
        max_tokens=120, seed=seed, temperature=1.0,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "record", "schema": schema, "strict": True}})
    check(out.choices[0].finish_reason == "stop", f"schema output unfinished: {out}")
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
lines = post_lines("/api/chat", {
    "model": MODEL, "messages": [{"role": "user", "content": "A record."}],
    "format": schema, "options": {"num_predict": 120, "seed": 5}})
jsonschema.validate(json.loads("".join(l["message"]["content"] for l in lines)), schema)
mode = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "JSON!"}], max_tokens=60,
    temperature=0, response_format={"type": "json_object"})
text = mode.choices[0].message.content
check(text.lstrip().startswith("{"), f"JSON mode: {text!r}")
if mode.choices[0].finish_reason == "stop":
    check(isinstance(json.loads(text), dict), f"JSON mode: {text!r}")

ids = [m.id for m in client.models.list()]
check(MODEL in ids, f"{MODEL} not in /v1/models: {ids}")

try:
    client.chat.completions.create(model="no-such-model",
                                   messages=[{"role": "user", "content": "hi"}])
    check(False, "an unknown model was accepted")
except openai.NotFoundError as e:
    check("no-such-model" in str(e), f"unknown model error: {e}")

# Ollama: /api/chat streams NDJSON objects with the documented fields.
lines = post_lines("/api/chat", {
    "model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
    "options": {"num_predict": 6, "temperature": 0}, "keep_alive": "10m"})
check(len(lines) == 7, f"/api/chat: {len(lines)} lines for 6 tokens")
for line in lines[:-1]:
    check(set(line) == {"model", "created_at", "message", "done"}, f"/api/chat line {line}")
    check(line["model"] == MODEL and line["done"] is False, f"/api/chat line {line}")
    check(line["message"]["role"] == "assistant"
          and isinstance(line["message"]["content"], str), f"/api/chat line {line}")
    rfc3339(line["created_at"])
last = lines[-1]
for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration"):
    check(isinstance(last.get(key), int) and last[key] >= 0, f"/api/chat final {key}: {last}")
check(last["done"] is True and last["done_reason"] == "length" and last["eval_count"] == 6,
      f"/api/chat final {last}")
check(last["total_duration"] >= last["prompt_eval_duration"] + last["eval_duration"],
      f"/api/chat durations {last}")

lines = post_lines("/api/generate", {"model": MODEL, "prompt": "Why is the sky blue?",
                                     "options": {"num_predict": 3}})
check([l["done"] for l in lines] == [False, False, False, True], f"/api/generate {lines}")
check(all(isinstance(l["response"], str) for l in lines), f"/api/generate {lines}")
check(lines[-1]["done_reason"] == "length", f"/api/generate final {lines[-1]}")

# Not streamed: one object.
req = urllib.request.Request(BASE + "/api/generate", data=json.dumps(
    {"model": MODEL, "prompt": "Hello", "stream": False, "options": {"num_predict": 2}}).encode())
with urllib.request.urlopen(req, timeout=60) as r:
    one = json.loads(r.read())
check(one["done"] is True and one["eval_count"] == 2 and one["response"], f"stream false {one}")

with urllib.request.urlopen(BASE + "/api/ps", timeout=10) as r:
    ps = json.loads(r.read())
check([m["name"] for m in ps["models"]] == [MODEL], f"/api/ps {ps}")
expires = rfc3339(ps["models"][0]["expires_at"])
left = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
check(500 < left <= 600, f"keep_alive 10m: expires in {left} s")
with urllib.request.urlopen(BASE + "/api/tags", timeout=10) as r:
    tags = json.loads(r.read())
check(any(m["name"] == MODEL and m["details"]["format"] == "gguf" for m in tags["models"]),
      f"/api/tags {tags}")

# /api/show describes the file; /api/delete never deletes what is not a download.
req = urllib.request.Request(BASE + "/api/show", data=json.dumps({"model": MODEL}).encode())
with urllib.request.urlopen(req, timeout=30) as r:
    shown = json.loads(r.read())
check(shown["model_info"]["general.architecture"] == "qwen3" and shown["template"]
      and shown["details"]["format"] == "gguf" and shown["details"]["quantization_level"],
      f"/api/show {shown}")
req = urllib.request.Request(BASE + "/api/delete", data=json.dumps({"model": MODEL}).encode(),
                             method="DELETE")
try:
    urllib.request.urlopen(req, timeout=30)
    check(False, "/api/delete removed a file it did not download")
except urllib.error.HTTPError as e:
    check(e.code == 400, f"/api/delete of a path: {e.code}")

# Prometheus text format.
with urllib.request.urlopen(BASE + "/metrics", timeout=10) as r:
    families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
for name, kind in [("paraphym_generated_tokens", "counter"),
                   ("paraphym_time_to_first_token_seconds", "histogram"),
                   ("paraphym_inter_token_seconds", "histogram"),
                   ("paraphym_queue_depth", "gauge"), ("paraphym_workers", "gauge"),
                   ("paraphym_memory_used_bytes", "gauge"),
                   ("paraphym_breaker_state", "gauge"),
                   ("paraphym_tokens_per_second", "gauge")]:
    check(name in families and families[name].type == kind, f"/metrics: {name} ({kind})")
ttft = {s.name: s.value for s in families["paraphym_time_to_first_token_seconds"].samples}
check(ttft["paraphym_time_to_first_token_seconds_count"] >= 6, f"TTFT count {ttft}")
idle = [s for s in families["paraphym_workers"].samples
        if s.labels == {"model": MODEL, "state": "idle"}]
check(idle and idle[0].value >= 1, f"idle workers {idle}")

# keep_alive 0 with an empty prompt unloads.
req = urllib.request.Request(BASE + "/api/generate", data=json.dumps(
    {"model": MODEL, "keep_alive": 0}).encode())
with urllib.request.urlopen(req, timeout=30) as r:
    unloaded = json.loads(r.read())
check(unloaded["done_reason"] == "unload", f"unload {unloaded}")
with urllib.request.urlopen(BASE + "/api/ps", timeout=10) as r:
    check(json.loads(r.read())["models"] == [], "still loaded after keep_alive 0")
print("ok")
