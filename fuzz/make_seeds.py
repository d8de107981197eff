#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/) and is kept to say where each
seed comes from. Run from anywhere: python3 fuzz/make_seeds.py. Images need Pillow
(`pip install pillow`); without it the image seeds already in the repository are kept.

Seeds are small valid inputs, one per shape the parser accepts, so that the fuzzer starts from
inside each branch rather than having to discover the format. Files named `regression-*` are not
written here: they are inputs that once crashed a target, kept as they were found (docs/fuzzing.md)."""

import base64
import io
import json
import shutil
import struct
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
CORPUS = FUZZ / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# --- protobuf, enough of it for epserve.v1.ExchangeRequest / ExchangeResponse -------------------

def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, value):
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def exchange_request(id, layer, groups, dtype, hidden, payload, step=0, micro_batch=0):
    out = field(1, id) + field(2, step) + field(3, layer) + field(4, micro_batch)
    for expert, rows in groups:
        out += field(5, field(1, expert) + field(2, rows))
    return out + field(6, dtype) + field(7, hidden) + field(8, payload)


def exchange_response(id, code, message, dtype, payload, micros):
    return field(1, id) + field(2, code) + field(3, message.encode()) + field(4, dtype) + field(5, payload) + field(6, micros)


BF16, F32, INT8 = 1, 2, 3


def bf16_rows(values):
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def exchange_seeds():
    # The tiny fixture's hidden size is 64 (tests/fixtures/tiny-llama4/config.json).
    hidden = 64
    rows = [0.5 * ((i * 37) % 11 - 5) for i in range(3 * hidden)]
    write("exchange_frame", "request-bf16", exchange_request(7, 1, [(3, 2), (5, 1)], BF16, hidden, bf16_rows(rows), step=4))
    write("exchange_frame", "request-f32", exchange_request(8, 3, [(0, 1)], F32, 4, struct.pack("<4f", 1, -2, 3.5, 0)))
    # int8: per row, one bf16 scale per 32 values, then the codes; 40 values = 2 scales.
    row = bf16_rows([0.25, 0.5]) + bytes(range(40))
    write("exchange_frame", "request-int8", exchange_request(9, 1, [(1, 1), (2, 1)], INT8, 40, row + row))
    write("exchange_frame", "response-ok", exchange_response(7, 0, "", BF16, bf16_rows(rows[: 2 * hidden]), 1234))
    write("exchange_frame", "response-rejected", exchange_response(9, 3, "expert 2 of layer 1 is not hosted on this worker", 0, b"", 0))


# --- OpenAI request bodies -------------------------------------------------------------------------

def png_bytes():
    return (ROOT / "tests/fixtures/tiny-llama4/golden/small.png").read_bytes()


def openai_seeds():
    png = base64.b64encode(png_bytes()).decode()
    wrapped = "\n".join(png[i : i + 76] for i in range(0, len(png), 76))
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": schema},
    }
    bodies = {
        "chat-minimal": {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]},
        "chat-sampling": {
            "model": "tiny",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "max_completion_tokens": 16,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "seed": -3,
            "stop": ["\n\n", "END"],
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repetition_penalty": 1.1,
            "logprobs": True,
            "top_logprobs": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": {"id": 1},
            "n": 1,
        },
        "chat-image": {
            "model": "tiny",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + wrapped, "detail": "low"}},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                }
            ],
        },
        "chat-json-schema": {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}},
        },
        "chat-json-object": {
            "model": "tiny",
            "messages": [{"role": "user", "content": "JSON please"}],
            "response_format": {"type": "json_object"},
        },
        "chat-tools": {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
        },
        "chat-tool-required": {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Call it"}],
            "tools": [tool],
            "tool_choice": "required",
        },
        "completion-text": {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "echo": False, "logprobs": 2},
        "completion-tokens": {"model": "tiny", "prompt": [1, 2, 3, 4294967295], "stop": "\n"},
        "completion-texts": {"model": "tiny", "prompt": ["a"], "response_format": {"type": "text"}, "ignore_eos": True},
    }
    for name, body in bodies.items():
        write("openai_request", name, json.dumps(body, indent=None if "image" in name else 1))


# --- safetensors -----------------------------------------------------------------------------------

def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] in file order."""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data


NO_CONFIG, FP8_CONFIG, W4A16_CONFIG = b"\x00", b"\x01", b"\x02"  # the target's first byte


def safetensors_seeds():
    f32 = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    seeds = {
        "two-tensors": NO_CONFIG
        + safetensors(
            [("model.norm.weight", "F32", [2, 3], f32), ("lm_head.weight", "BF16", [2, 2], bf16_rows([1, -1, 0.5, 2]))],
            metadata={"format": "pt"},
        ),
        "f16-scalar": NO_CONFIG + safetensors([("scale", "F16", [], struct.pack("<e", 0.5))]),
        "empty": NO_CONFIG + safetensors([("empty", "F32", [0, 4], b"")]),
        # compressed-tensors, as the fixtures tiny-llama4-fp8 and tiny-llama4-w4a16 store them.
        "fp8": FP8_CONFIG
        + safetensors(
            [
                ("model.layers.0.feed_forward.shared_expert.down_proj.weight", "F8_E4M3", [2, 4], bytes([0x38, 0xB8, 0, 0x7E, 1, 2, 3, 4])),
                ("model.layers.0.feed_forward.shared_expert.down_proj.weight_scale", "BF16", [2, 1], bf16_rows([0.5, 0.25])),
            ]
        ),
        "w4a16": W4A16_CONFIG
        + safetensors(
            [
                ("q.weight_packed", "I32", [2, 4], bytes(range(32))),
                ("q.weight_scale", "BF16", [2, 1], bf16_rows([0.5, 0.25])),
                ("q.weight_shape", "I64", [2], struct.pack("<2q", 2, 32)),
            ]
        ),
    }
    for name, data in seeds.items():
        write("safetensors_header", name, data)


# --- config.json -----------------------------------------------------------------------------------

def config_seeds():
    for name in ["tiny-llama4", "tiny-llama4-top2", "tiny-llama4-fp8", "tiny-llama4-w4a16", "scout-config"]:
        shutil.copy(ROOT / "tests/fixtures" / name / "config.json", CORPUS / "model_config" / name)


# --- images ----------------------------------------------------------------------------------------

def image_seeds():
    for name in ["small.png", "wide.png"]:
        shutil.copy(ROOT / "tests/fixtures/tiny-llama4/golden" / name, CORPUS / "image_decode" / name)
    try:
        from PIL import Image
    except ImportError:
        print("Pillow is missing: the JPEG, GIF and WebP seeds are left as they are")
        return
    rgb = Image.new("RGB", (12, 8))
    rgb.putdata([((x * 20) % 256, (y * 30) % 256, (x * y * 7) % 256) for y in range(8) for x in range(12)])

    def encoded(image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()

    write("image_decode", "rgb.jpg", encoded(rgb, "JPEG", quality=50))
    write("image_decode", "progressive.jpg", encoded(rgb, "JPEG", quality=50, progressive=True))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90°
    write("image_decode", "exif-rotated.jpg", encoded(rgb, "JPEG", quality=50, exif=exif.tobytes()))
    write("image_decode", "gray.jpg", encoded(rgb.convert("L"), "JPEG", quality=50))
    write("image_decode", "palette.gif", encoded(rgb.convert("P"), "GIF"))
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    write("image_decode", "alpha.png", encoded(rgba, "PNG"))
    write("image_decode", "lossy.webp", encoded(rgb, "WEBP", quality=50))
    write("image_decode", "lossless.webp", encoded(rgba, "WEBP", lossless=True))


if __name__ == "__main__":
    exchange_seeds()
    openai_seeds()
    safetensors_seeds()
    config_seeds()
    image_seeds()
