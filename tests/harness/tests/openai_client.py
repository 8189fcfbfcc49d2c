"""The official OpenAI Python client against the kvmesh gateway.

Run by tests/stack.rs: python openai_client.py BASE_URL MODEL SYSTEM_PROMPT.
Exits non-zero (an AssertionError or the client's exception) on any failure.
"""

import sys

import openai

base_url, model, system = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
messages = [
    {"role": "system", "content": system},
    {"role": "user", "content": "Name one colour."},
]

# Chat, not streaming.
first = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
assert first.object == "chat.completion", first
assert first.choices[0].message.role == "assistant", first
assert first.choices[0].message.content, first
assert first.usage.prompt_tokens > 64 and 0 < first.usage.completion_tokens <= 8, first.usage

# The same prompt again: the prefix-aware gateway sends it to the replica that
# holds its KV blocks, and the client sees them as cached tokens.
again = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
cached = again.usage.prompt_tokens_details.cached_tokens
assert cached >= 64, f"expected the repeated prompt's prefix cached, usage {again.usage}"
assert again.choices[0].message.content == first.choices[0].message.content, "greedy output changed"

# Chat, streaming, with usage in the last chunk.
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text == first.choices[0].message.content, (text, first.choices[0].message.content)
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens == first.usage.completion_tokens, usage

# Completions.
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
assert completion.choices[0].text, completion
assert completion.usage.completion_tokens <= 4, completion.usage

# Models.
assert model in [m.id for m in client.models.list().data]

# A bad request: the server's 400 reaches the client as BadRequestError.
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=5)
except openai.BadRequestError as e:
    assert e.status_code == 400, e
    assert "temperature" in str(e), e
else:
    raise AssertionError("temperature=5 was accepted")

print("openai client: all checks passed")
