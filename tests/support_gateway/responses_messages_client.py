"""Drives the gateway with the unchanged `openai` (Responses API) and
`anthropic` (messages) Python SDKs, streaming and not, every call with the
same long system prompt.

Usage: responses_messages_client.py GATEWAY_URL MODEL
Prints one JSON line: the replica that served each call and the usage the
SDKs reported (input, output and prefix-cached input tokens). Exits non-zero (with a message) on any mismatch.
"""
import json
import sys

import anthropic
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
oa = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
an = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=30)
SYSTEM = "You are the support assistant of a small railway company. " * 24
served, usage = [], {"input": 0, "output": 0, "cached": 0}


def seen(replica, inp, out, cached):
    served.append(replica)
    usage["input"] += inp
    usage["output"] += out
    usage["cached"] += cached or 0


# Responses API, not streamed.
raw = oa.responses.with_raw_response.create(
    model=model, instructions=SYSTEM, input="When does the first train leave?", max_output_tokens=6)
r = raw.parse()
assert r.output_text, r
assert r.usage.output_tokens == 6, r.usage
seen(raw.headers["x-infergate-replica"], r.usage.input_tokens, r.usage.output_tokens,
     r.usage.input_tokens_details.cached_tokens)

# Responses API, streamed: deltas, then response.completed with the usage.
stream = oa.responses.create(
    model=model, instructions=SYSTEM, input=[{"role": "user", "content": "And the last one?"}],
    max_output_tokens=7, stream=True)
deltas, done = [], None
for ev in stream:
    if ev.type == "response.output_text.delta":
        deltas.append(ev.delta)
    elif ev.type == "response.completed":
        done = ev.response
assert len(deltas) == 7, deltas
assert done is not None and done.usage.output_tokens == 7, done
assert done.output_text == "".join(deltas), (done.output_text, deltas)
seen(stream.response.headers["x-infergate-replica"], done.usage.input_tokens, done.usage.output_tokens,
     done.usage.input_tokens_details.cached_tokens)

# Anthropic messages, not streamed.
raw = an.messages.with_raw_response.create(
    model=model, system=SYSTEM, max_tokens=5,
    messages=[{"role": "user", "content": "Is there a night train?"}])
m = raw.parse()
assert m.content[0].text, m
assert m.usage.output_tokens == 5 and m.stop_reason == "max_tokens", m
seen(raw.headers["x-infergate-replica"], m.usage.input_tokens, m.usage.output_tokens,
     m.usage.cache_read_input_tokens)

# Anthropic messages, streamed with the SDK's stream helper.
with an.messages.stream(
        model=model, system=[{"type": "text", "text": SYSTEM}], max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Can I bring a bike?"}]}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
    replica = s.response.headers["x-infergate-replica"]
assert text and final.content[0].text == text, (text, final)
assert final.usage.output_tokens == 4, final.usage
assert final.usage.input_tokens > 0, final.usage
seen(replica, final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens)

# Errors on the messages API come in Anthropic's shape, which the SDK maps to
# its own exception types.
try:
    an.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    sys.exit("an unknown model was answered")
except anthropic.NotFoundError as e:
    assert e.status_code == 404, e
    assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
    assert "no-such-model" in e.body["error"]["message"], e.body

assert usage["cached"] > 0, usage
print(json.dumps({"replicas": served, "input_tokens": usage["input"], "output_tokens": usage["output"],
                  "cached_tokens": usage["cached"]}))
