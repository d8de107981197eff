"""Structured outputs end to end with the official `openai` Python client, on a random-weight
checkpoint (its free text is gibberish: only the grammar can make its answers valid).

Usage: python3 tests/openai_structured.py BASE_URL MODEL REQUESTS
Sends REQUESTS chat completions at temperature 1.0 with a nested `json_schema` and checks every answer
with the `jsonschema` package (an independent validator); then `json_object` requests (those that end
must parse as JSON objects, those cut by max_tokens must be the beginning of one), the same through
`/v1/completions`' `response_format` extension, and the 400s for schemas that cannot be enforced. Exits non-zero naming the first failure.
"""

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

base_url, model, requests = sys.argv[1], sys.argv[2], int(sys.argv[3])
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


class Incomplete(Exception):
    """The text ended inside a JSON value: a prefix, not an error."""


def value_end(s, i):
    """Index after the JSON value at s[i:]; Incomplete if s ends inside it, ValueError if invalid."""
    if i >= len(s):
        raise Incomplete
    c = s[i]
    if c in "{[":
        close, i = "}" if c == "{" else "]", i + 1
        if i < len(s) and s[i] == close:
            return i + 1
        while True:
            if c == "{":
                if i >= len(s):
                    raise Incomplete
                if s[i] != '"':
                    raise ValueError(f"key expected at {i}")
                i = value_end(s, i)
                if i >= len(s):
                    raise Incomplete
                if s[i : i + 2] != ": "[: len(s) - i]:
                    raise ValueError(f"': ' expected at {i}")
                i += 2
            i = value_end(s, i)
            if i >= len(s):
                raise Incomplete
            if s[i] == close:
                return i + 1
            if s[i : i + 2] != ", "[: len(s) - i]:
                raise ValueError(f"', ' or {close} expected at {i}")
            i += 2
    if c == '"':
        i += 1
        while i < len(s):
            if s[i] == "\\":
                i += 2
            elif s[i] == '"':
                return i + 1
            else:
                i += 1
        raise Incomplete
    for literal in ("true", "false", "null"):
        if s.startswith(literal, i):
            return i + len(literal)
        if literal.startswith(s[i:]):
            raise Incomplete
    if re.fullmatch(r"-(0|[1-9][0-9]*)?|-?(0|[1-9][0-9]*)(\.[0-9]*)?([eE][+-]?[0-9]*)?", s[i:]):
        raise Incomplete  # the text ends inside a number
    m = re.match(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", s[i:])
    if not m or not m.group(0):
        raise ValueError(f"value expected at {i}")
    return i + m.end()


def is_object_prefix(text):
    """Whether `text` is the beginning of a JSON object in the server's layout."""
    try:
        value_end(text, 0)
        return False  # complete: not cut
    except Incomplete:
        return text.startswith("{")
    except ValueError:
        return False


def ask_object(i):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Any JSON object, please ({i})."}],
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=1000 + i,
        max_tokens=300,
    )
    return i, r.choices[0]


# A random model writes free-form strings that go on for thousands of tokens (measured: 17 of 20
# such objects end within 3,000 tokens, 6 within 300), so an answer may be cut by max_tokens. Every
# answer that ends parses as an object; every cut one is the beginning of one.
ended = 0
with ThreadPoolExecutor(16) as pool:
    for i, choice in pool.map(ask_object, range(20)):
        text = choice.message.content
        if choice.finish_reason == "length":
            assert is_object_prefix(text), f"request {i}: cut, and not the beginning of an object: {text!r}"
            continue
        assert choice.finish_reason == "stop", choice
        assert isinstance(json.loads(text), dict), text
        ended += 1
assert ended >= 1, "no json_object answer ended within max_tokens"
assert not is_object_prefix('{"a": 1}x') and not is_object_prefix('{"a" 1') and is_object_prefix('{"a": [tr')
print(f"{ended} of 20 json_object answers ended and parse; the others are prefixes of objects")

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
