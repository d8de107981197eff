"""End-to-end check of the gateway with the official `openai` Python client.

Usage: python3 tests/openai_client.py BASE_URL API_KEY MODEL
Exits non-zero (with the failing check) if anything differs from what the client expects.
"""

import sys

import openai

base_url, api_key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three primes."},
]

# Models list.
models = client.models.list()
assert [m.id for m in models.data] == [model], models

# Chat completion.
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
choice = chat.choices[0]
assert chat.object == "chat.completion", chat
assert choice.message.role == "assistant", choice
assert choice.finish_reason in ("stop", "length"), choice
assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 10, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Streamed chat completion: the chunks reassemble to the non-streamed text at temperature 0.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(pieces) == choice.message.content, ("".join(pieces), choice.message.content)
assert finish == choice.finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Logprobs.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content), content

# Text completion.
completion = client.completions.create(model=model, prompt="The experts", max_tokens=8, temperature=0)
assert completion.object == "text_completion", completion
assert completion.choices[0].finish_reason in ("stop", "length")
assert completion.usage.completion_tokens >= 1

# Streamed logprobs: one entry per token, over the chunks.
streamed = [
    t
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    for c in chunk.choices
    if c.logprobs is not None
    for t in c.logprobs.content
]
assert [t.token for t in streamed] == [t.token for t in content], (streamed, content)

# Streamed text completion: the chunks reassemble to the non-streamed text at temperature 0.
text_stream = client.completions.create(model=model, prompt="The experts", max_tokens=8, temperature=0, stream=True)
assert "".join(c.choices[0].text for c in text_stream if c.choices) == completion.choices[0].text

# Legacy logprobs: parallel lists, alternatives as {token: logprob} (at most 2; equal texts merge).
legacy = client.completions.create(model=model, prompt="The experts", max_tokens=4, temperature=0, logprobs=2)
lp = legacy.choices[0].logprobs
assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens, lp
assert all(1 <= len(top) <= 2 for top in lp.top_logprobs), lp

# Wrong key: 401, raised as AuthenticationError.
bad = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0)
try:
    bad.models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["code"] == "invalid_api_key", e.body

# Bad parameter: 400, raised as BadRequestError naming the parameter.
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "temperature", e.body

# Unknown model: 404.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body

print("openai client checks passed")
