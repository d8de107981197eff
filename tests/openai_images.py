"""End-to-end check of image input with the official `openai` Python client.

Usage: python3 tests/openai_images.py BASE_URL API_KEY MODEL IMAGE_DIR FETCH
  IMAGE_DIR holds wide.png and small.png (the tiny fixture's golden images);
  FETCH is `on` when the server runs with --image-fetch --image-fetch-allow-private, else `off`.
Prints the greedy text of the one-image chat on its last line (for comparison with
`epserve generate --image`). Exits non-zero with the failing check otherwise.
"""

import base64
import json
import http.server
import os
import sys
import threading

import openai

base_url, api_key, model, image_dir, fetch = sys.argv[1:6]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


def data_uri(name):
    with open(os.path.join(image_dir, name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def chat(content, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **kw
    )


def refused(content, param):
    try:
        chat(content)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.body["param"] == param, (e.body, param)
        return e.body["message"]
    raise AssertionError(f"expected a 400 naming {param}")


wide = [image(data_uri("wide.png")), {"type": "text", "text": "What do you see?"}]

# One image: an answer, usage counting the image tokens.
one = chat(wide)
assert one.choices[0].finish_reason in ("stop", "length"), one
text_only = chat([{"type": "text", "text": "What do you see?"}])
assert one.usage.prompt_tokens > text_only.usage.prompt_tokens + 16, (one.usage, text_only.usage)

# Streaming gives the same text and usage.
pieces, usage = [], None
for chunk in chat(wide, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
assert "".join(pieces) == one.choices[0].message.content, (pieces, one.choices[0].message.content)
assert usage.prompt_tokens == one.usage.prompt_tokens, usage

# Two images in one message, interleaved with text.
two = chat([image(data_uri("small.png")), {"type": "text", "text": "and"}, image(data_uri("wide.png"))])
# small.png is one tile (4 <|patch|>), wide.png 1×3 tiles and the global one (16), each with its markers.
assert two.usage.prompt_tokens >= 4 + 3 + 16 + 9, two.usage
assert two.choices[0].finish_reason in ("stop", "length"), two

# Each bad image is a 400 naming its part.
at = "messages[0].content[1]"
refused([{"type": "text", "text": "x"}, image("data:image/png;base64,@@@")], at)
refused([{"type": "text", "text": "x"}, image("data:image/png;base64," + base64.b64encode(b"not an image").decode())], at)
refused([{"type": "text", "text": "x"}, image("file:///etc/passwd")], at)
refused([{"type": "text", "text": "x"}, image("data:image/bmp;base64," + base64.b64encode(b"BM" + bytes(60)).decode())], at)
# The server runs with --max-image-bytes 4096 and --max-images-per-request 2.
refused([{"type": "text", "text": "x"}, image("data:image/png;base64," + base64.b64encode(bytes(5000)).decode())], at)
refused([image(data_uri("small.png")), image(data_uri("small.png")), image(data_uri("small.png"))], "messages[0].content[2]")

# A URL image from a loopback HTTP server: served when fetching is on, a 400 when it is off.
handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=image_dir, **kw)  # noqa: E731
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/wide.png"
if fetch == "on":
    fetched = chat([image(url), {"type": "text", "text": "What do you see?"}])
    assert fetched.choices[0].message.content == one.choices[0].message.content, fetched
else:
    message = refused([{"type": "text", "text": "x"}, image(url)], at)
    assert "--image-fetch" in message, message
server.shutdown()

print(json.dumps(one.choices[0].message.content))
