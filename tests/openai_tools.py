"""Tool calling end to end with the official `openai` Python client, on the random-weight tiny
fixture (it only calls tools well because the grammar makes it).

Usage: python3 tests/openai_tools.py BASE_URL MODEL TOOL_CHAT_GOLDEN
Checks: `tool_choice` "required" and a named function give `tool_calls` whose arguments validate
against the tool's schema (the `jsonschema` package), `parallel_tool_calls: false` gives one call,
streamed calls reassemble to the non-streamed ones, a conversation with calls and tool results counts
exactly the prompt tokens transformers' apply_chat_template gives (TOOL_CHAT_GOLDEN), "auto" answers
either text or calls, and bad tool requests are 400s naming the parameter.
"""

import json
import sys

import jsonschema
import openai

base_url, model, golden_path = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"tz": {"enum": ["UTC", "Europe/Oslo", "Asia/Tokyo"]}},
    "required": ["tz"],
    "additionalProperties": False,
}
SCHEMAS = {"get_weather": WEATHER, "local_time": TIME}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
MESSAGES = [{"role": "user", "content": "What's the weather in Oslo?"}]


def check_calls(message, only=None):
    assert message.tool_calls, message
    ids = set()
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.id not in ids, call
        ids.add(call.id)
        assert call.function.name in SCHEMAS, call
        if only:
            assert call.function.name == only, call
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, c.function.arguments) for c in message.tool_calls]


def stream_calls(**kwargs):
    """The tool calls of a streamed answer, reassembled from their deltas as a client does."""
    calls, finish = {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                if d.function and d.function.name:
                    call["name"] += d.function.name
                if d.function and d.function.arguments:
                    call["arguments"] += d.function.arguments
            finish = c.finish_reason or finish
    return [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)], finish


# Required: one or more calls, arguments valid, at temperature 1 too.
for seed in range(6):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=800
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice.message
    check_calls(choice.message)

# A named function: exactly that one, once.
named = {"type": "function", "function": {"name": "local_time"}}
r = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS, tool_choice=named, max_tokens=200)
calls = check_calls(r.choices[0].message, only="local_time")
assert len(calls) == 1 and r.choices[0].finish_reason == "tool_calls", r

# parallel_tool_calls false: exactly one call.
for seed in range(4):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=seed, max_tokens=200,
    )
    assert len(check_calls(r.choices[0].message)) == 1, r

# Streaming reassembles to the same calls as not streaming (greedy, and seeded).
for kwargs in [
    dict(tool_choice="required", temperature=0),
    dict(tool_choice=named, temperature=0),
    dict(tool_choice="required", temperature=1.0, seed=11),
]:
    args = dict(model=model, messages=MESSAGES, tools=TOOLS, max_tokens=800, **kwargs)
    whole = check_calls(client.chat.completions.create(**args).choices[0].message)
    streamed, finish = stream_calls(**args)
    assert streamed == whole, (streamed, whole)
    assert finish == "tool_calls", finish

# Auto: the model chooses; either way the answer is well-formed.
for seed in range(3):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=40
    )
    m = r.choices[0].message
    assert (m.tool_calls is None) == (r.choices[0].finish_reason != "tool_calls"), r
    assert m.tool_calls is None or m.content is None, m

# A conversation with calls and results renders as transformers renders it: same prompt tokens.
golden = json.load(open(golden_path))
for case in golden["conversations"]:
    req = case["request"]
    r = client.chat.completions.create(model=model, messages=req["messages"], tools=req["tools"], max_tokens=1)
    assert r.usage.prompt_tokens == len(case["input_ids"]), (case["name"], r.usage, len(case["input_ids"]))

# Bad tool requests: 400s naming the parameter.
for kwargs, param in [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}}), "tool_choice.function.name"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name"),
    (
        dict(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "uniqueItems": True}}}],
            tool_choice="required",
        ),
        "tools[0].function.parameters",
    ),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format"),
]:
    try:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, **kwargs)
        raise AssertionError(f"{kwargs} was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (kwargs, e.body)
print("ok")
