"""The Batch API end to end with the official `openai` Python client (issue 18).

Usage: python3 tests/openai_batch.py BASE_URL API_KEY MODEL MAX_FILE_BYTES
Exits non-zero (with the failing check) if anything differs from what the client and the contract
expect: 200 mixed lines (a chat batch and a completions batch, running together) whose bodies equal
the same requests made directly (greedy), list pagination, a cancel mid-run, a file of bad lines,
the Files API and its limits.
"""

import io
import json
import math
import sys
import time

import openai

base_url, api_key, model, max_file_bytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)

WORDS = ["red", "blue", "green", "seven", "river", "stone", "cloud", "north", "apple", "tiger"]


def chat_body(i):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Say something about {WORDS[i % 10]} number {i}."}],
        "max_tokens": 6 + i % 5,
        "temperature": 0,
    }
    if i % 7 == 0:
        body["logprobs"] = True
        body["top_logprobs"] = 2
    return body


def completion_body(i):
    body = {"model": model, "prompt": f"The {WORDS[(i * 3) % 10]} of {i} is", "max_tokens": 5 + i % 4, "temperature": 0}
    if i % 5 == 0:
        body["stop"] = [" the"]
    return body


def jsonl(lines):
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def upload(lines, name):
    f = client.files.create(file=(name, jsonl(lines)), purpose="batch")
    assert f.id.startswith("file-") and f.purpose == "batch" and f.filename == name, f
    assert f.bytes > 0 and f.created_at > 0 and f.object == "file", f
    return f


def wait(batch_id, done=("completed", "failed", "expired", "cancelled"), timeout=300):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        b = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != b.status:
            seen.append(b.status)
        if b.status in done:
            return b, seen
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not finish: statuses {seen}")


def same(a, b, path="body"):
    """Equal JSON, floats (logprobs) within 1e-3: a line runs batched with other requests than the
    direct request, and batched arithmetic may differ in the last bits (the cluster exchanges f32
    activations, see tests/batch.rs, so those bits stay small); tokens and text may not."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), (path, a, b)
        assert math.isclose(a, b, abs_tol=1e-3), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def comparable(body):
    """A response body without what differs between two identical requests."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def output_lines(file_id):
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# 200 mixed lines: a chat batch and a completions batch, running together.
N = 100
chat_lines = [
    {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(i)} for i in range(N)
]
text_lines = [
    {"custom_id": f"text-{i}", "method": "POST", "url": "/v1/completions", "body": completion_body(i)} for i in range(N)
]
chat_file, text_file = upload(chat_lines, "chat.jsonl"), upload(text_lines, "text.jsonl")
assert client.files.retrieve(chat_file.id).bytes == chat_file.bytes
assert client.files.content(chat_file.id).content == jsonl(chat_lines).getvalue(), "content is the upload"
chat_batch = client.batches.create(
    input_file_id=chat_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "chat"}
)
text_batch = client.batches.create(input_file_id=text_file.id, endpoint="/v1/completions", completion_window="24h")
assert chat_batch.status == "validating" and chat_batch.metadata == {"job": "chat"}, chat_batch
assert chat_batch.object == "batch" and chat_batch.input_file_id == chat_file.id, chat_batch
assert chat_batch.expires_at == chat_batch.created_at + 24 * 3600, chat_batch

progress = set()
for batch, lines, direct in [
    (chat_batch, chat_lines, lambda body: client.chat.completions.with_raw_response.create(**body).http_response.json()),
    (text_batch, text_lines, lambda body: client.completions.with_raw_response.create(**body).http_response.json()),
]:
    deadline = time.time() + 300
    while True:
        b = client.batches.retrieve(batch.id)
        if b.status == "in_progress":
            progress.add(b.request_counts.completed)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            done = b
            break
        assert time.time() < deadline, b
        time.sleep(0.02)
    assert done.status == "completed", done
    assert done.request_counts.total == N and done.request_counts.completed == N, done.request_counts
    assert done.request_counts.failed == 0 and done.error_file_id is None, done
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None, (stamp, done)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at, done
    out = output_lines(done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(line["custom_id"] for line in lines), "one line per custom_id"
    by_id = {o["custom_id"]: o for o in out}
    for line in lines:
        o = by_id[line["custom_id"]]
        assert o["id"].startswith("batch_req") and o["error"] is None, o
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"], o
        got, want = comparable(o["response"]["body"]), comparable(direct(line["body"]))
        same(got, want, line["custom_id"])
        assert set(got) >= {"object", "model", "choices", "usage"}, got
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output", out_file
assert len(progress) >= 2, f"request_counts moved while the batches ran: {sorted(progress)}"
print("200 mixed lines equal to direct requests; counts seen in progress:", sorted(progress)[:8], file=sys.stderr)

# Pagination: newest first, one per page, every batch once.
first = client.batches.list(limit=1)
assert len(first.data) == 1 and first.has_more, first
ids = [b.id for b in client.batches.list(limit=1)]  # auto-paging follows `after`
assert len(ids) == len(set(ids)) and {chat_batch.id, text_batch.id} <= set(ids), ids
assert ids.index(text_batch.id) < ids.index(chat_batch.id), "newest first"

# A file of bad lines fails whole, naming each bad line.
good = chat_lines[0]
bad_lines = [
    json.dumps(good),
    "{not json",
    json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": chat_body(1)}),
    json.dumps(good),
    json.dumps({**chat_lines[2], "method": "GET"}),
    json.dumps({**chat_lines[3], "url": "/v1/embeddings"}),
    json.dumps({**chat_lines[4], "body": {**chat_body(4), "temperature": 7}}),
    json.dumps({**chat_lines[5], "body": {**chat_body(5), "stream": True}}),
    json.dumps({**chat_lines[6], "body": {**chat_body(6), "model": "no-such-model"}}),
]
bad_file = client.files.create(file=("bad.jsonl", io.BytesIO("\n".join(bad_lines).encode())), purpose="batch")
bad = client.batches.create(input_file_id=bad_file.id, endpoint="/v1/chat/completions", completion_window="24h")
bad, _ = wait(bad.id)
assert bad.status == "failed" and bad.failed_at is not None, bad
assert bad.output_file_id is None and bad.request_counts.completed == 0, bad
errors = {e.line: e for e in bad.errors.data}
assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8, 9], bad.errors
assert errors[2].code == "invalid_json_line" and errors[3].param == "custom_id", errors
assert errors[4].code == "duplicate_custom_id" and errors[5].param == "method" and errors[6].param == "url", errors
assert errors[7].param == "body.temperature" and errors[8].param == "body.stream", errors
assert "no-such-model" in errors[9].message and errors[9].param == "body.model", errors
assert all(e.message.startswith(f"Line {n}") for n, e in errors.items()), errors
print("bad lines named:", {k: v.code for k, v in errors.items()}, file=sys.stderr)

# Cancel mid-run: the finished lines are in the output file, the rest never ran.
long_lines = [
    {
        "custom_id": f"long-{i}",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": f"Count {i}", "max_tokens": 48, "temperature": 0, "ignore_eos": True},
    }
    for i in range(400)
]
long_file = upload(long_lines, "long.jsonl")
long = client.batches.create(input_file_id=long_file.id, endpoint="/v1/completions", completion_window="24h")
deadline = time.time() + 120
while True:
    b = client.batches.retrieve(long.id)
    if b.request_counts.completed >= 1:
        break
    assert b.status in ("validating", "in_progress") and time.time() < deadline, b
    time.sleep(0.05)
try:
    client.files.delete(long_file.id)
    raise AssertionError("deleting the input of a running batch must fail")
except openai.ConflictError:
    pass
cancelling = client.batches.cancel(long.id)
assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at, cancelling
cancelled, statuses = wait(long.id)
assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None, (cancelled, statuses)
assert cancelled.cancelling_at is not None and cancelled.completed_at is None, cancelled
done = cancelled.request_counts.completed
assert 1 <= done < 400, cancelled.request_counts
out = output_lines(cancelled.output_file_id)
assert len(out) == done and len({o["custom_id"] for o in out}) == done, (len(out), done)
assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in out)
try:
    client.batches.cancel(long.id)
    raise AssertionError("cancelling a cancelled batch must fail")
except openai.ConflictError:
    pass
print(f"cancelled after {done} of 400 lines", file=sys.stderr)

# Files: purpose and size checked, listed, deleted, 404 after; unknown ids are 404.
try:
    client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    raise AssertionError("purpose fine-tune must be refused")
except openai.BadRequestError as e:
    assert "purpose" in str(e), e
try:
    client.files.create(file=("big.jsonl", io.BytesIO(b"x" * (max_file_bytes + 1))), purpose="batch")
    raise AssertionError("a file over the limit must be refused")
except openai.APIStatusError as e:
    assert e.status_code == 413 and str(max_file_bytes) in str(e), e
listed = [f.id for f in client.files.list()]
assert chat_file.id in listed and text_file.id in listed, listed
outputs = [f.id for f in client.files.list(purpose="batch_output")]
assert outputs and chat_file.id not in outputs, outputs
assert client.files.delete(chat_file.id).deleted
try:
    client.files.retrieve(chat_file.id)
    raise AssertionError("a deleted file must be gone")
except openai.NotFoundError:
    pass
for call in (lambda: client.batches.retrieve("batch-0123456789abcdef01234567"), lambda: client.batches.retrieve("../x")):
    try:
        call()
        raise AssertionError("an unknown batch must be 404")
    except openai.NotFoundError:
        pass
try:
    client.batches.create(input_file_id=text_file.id, endpoint="/v1/embeddings", completion_window="24h")
    raise AssertionError("an unsupported endpoint must be refused")
except openai.BadRequestError as e:
    assert "endpoint" in str(e), e
print("ok", file=sys.stderr)
