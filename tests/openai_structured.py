"""Structured outputs end to end with the official `openai` Python client, on a random-weight
checkpoint (its free text is gibberish: only the grammar can make its answers valid).

Usage: python3 tests/openai_structured.py BASE_URL MODEL REQUESTS
Sends REQUESTS chat completions at temperature 1.0 with a nested `json_schema` and checks every answer
with the `jsonschema` package (an independent validator); then `json_object` requests with budgets from 12 to
300 tokens (every answer must parse as a JSON object: the engine closes a document that would not fit), the same through
`/v1/completions`' `response_format` extension, and the 400s for schemas that cannot be enforced. Exits non-zero naming the first failure.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

base_url, model, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
OBJECT_REQUESTS = 60
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "status": {"enum": ["open", "closed", "pending"]},
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
            },
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["id", "status", "owner", "tags", "active"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA, "strict": True}}


def ask(i):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Ticket {i} as JSON."}],
        response_format=FORMAT,
        temperature=1.0,
        seed=i,
        max_tokens=400,
    )
    return i, r.choices[0]


failures = []
with ThreadPoolExecutor(16) as pool:
    for i, choice in pool.map(ask, range(requests)):
        text = choice.message.content
        try:
            assert choice.finish_reason == "stop", f"finish_reason {choice.finish_reason}"
            jsonschema.validate(json.loads(text), SCHEMA)
        except Exception as e:  # noqa: BLE001 - every failure is reported with its request
            failures.append(f"request {i}: {e}: {text!r}")
assert not failures, "\n".join(failures[:5]) + f"\n({len(failures)} of {requests} failed)"
print(f"{requests} json_schema answers validate")


# Budgets from barely enough to ample: a random model writes free-form strings thousands of tokens
# long (measured: 6 of 20 objects end within 300 tokens on their own), so most of these answers are
# closed by the engine before max_tokens cuts them.
OBJECT_BUDGETS = [12, 24, 40, 64, 100, 300]


def ask_object(i):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Any JSON object, please ({i})."}],
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1000 + i,
        max_tokens=OBJECT_BUDGETS[i % len(OBJECT_BUDGETS)],
    )
    return i, r.choices[0]


# Every answer parses as an object. Those the budget made the engine close end with "length", as a
# shortened answer must; those that ended on their own end with "stop".
finishes = {"stop": 0, "length": 0}
with ThreadPoolExecutor(16) as pool:
    for i, choice in pool.map(ask_object, range(OBJECT_REQUESTS)):
        text = choice.message.content
        try:
            value = json.loads(text)
        except ValueError as e:
            raise AssertionError(f"json_object request {i} (max_tokens {OBJECT_BUDGETS[i % len(OBJECT_BUDGETS)]}): {e}: {text!r}")
        assert isinstance(value, dict), text
        assert choice.finish_reason in finishes, choice
        finishes[choice.finish_reason] += 1
assert finishes["length"] >= 1, "no json_object answer needed closing: the budgets test nothing"
print(f"{OBJECT_REQUESTS} json_object answers all parse ({finishes['stop']} ended, {finishes['length']} closed for max_tokens)")

# The text API's extension field.
text = client.completions.create(
    model=model, prompt="JSON:", max_tokens=400, temperature=1.0, seed=5, extra_body={"response_format": FORMAT}
)
jsonschema.validate(json.loads(text.choices[0].text), SCHEMA)
assert text.choices[0].finish_reason == "stop", text

# Streaming gives the same document as not streaming (seeded).
kwargs = dict(model=model, messages=[{"role": "user", "content": "x"}], response_format=FORMAT, seed=3, max_tokens=400)
whole = client.chat.completions.create(**kwargs).choices[0].message.content
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices)
assert streamed == whole, (streamed, whole)

# Schemas that cannot be enforced are 400s naming the parameter.
for bad, says in [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, "no-such-format"),
]:
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
            max_tokens=5,
        )
        raise AssertionError(f"schema {bad} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "response_format.json_schema.schema", e.body
        assert says in e.body["message"], e.body
print("ok")
