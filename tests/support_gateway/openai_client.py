"""Drives the gateway with the unchanged `openai` Python SDK.

Usage: openai_client.py BASE_URL MODEL
Exits non-zero (with a message) on any mismatch.
"""
import sys

from openai import OpenAI, APIStatusError

base_url, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
messages = [{"role": "user", "content": "Say something."}]

# Non-streaming chat.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens == 8, r.usage

# Streaming chat with usage.
pieces, usage = [], None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert len(pieces) == 8, pieces
assert usage is not None and usage.completion_tokens == 8, usage

# Completions, both ways.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
assert c.choices[0].text, c
texts = [x.choices[0].text for x in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=5, stream=True) if x.choices]
assert len(texts) == 5, texts

# Model list and an error.
ids = [m.id for m in client.models.list().data]
assert model in ids, ids
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise SystemExit("expected a 404")
except APIStatusError as e:
    assert e.status_code == 404, e
    assert e.body["code"] == "model_not_found", e.body

print("openai sdk ok")
