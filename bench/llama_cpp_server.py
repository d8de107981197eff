#!/usr/bin/env python3
"""llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`), as bench/compare.sh runs it.

Usage: llama_cpp_server.py [llama_cpp.server flags: --model X.gguf --n_threads N --port P ...]

The app is llama-cpp-python's own (`llama_cpp.server.app.create_app`, same settings and flags as
`python -m llama_cpp.server`), started with uvicorn the same way. Three things are added, each
only to make the same `epserve bench` workload possible, none of them in the generation path:

1. `ignore_eos: true` in a /v1/completions body (which this server does not know, and silently drops)
   becomes a `logit_bias` of -1e9 on every end-of-generation token of the vocabulary
   (`llama_vocab_is_eog`), so each request produces exactly `max_tokens` tokens. This is what
   llama.cpp's own `llama-server` does for `ignore_eos`.
2. A request without `repeat_penalty` gets `repeat_penalty: 1.0`: llama-cpp-python's default is 1.1,
   OpenAI's API has no repetition penalty, and `temperature: 0` should mean plain greedy decoding.
3. A streamed completion ends with a usage chunk (`{"choices": [], "usage": {...}}`, as OpenAI's
   `stream_options.include_usage` gives), counted from the tokens the model generated: the stream
   itself has one chunk per decoded piece of text, which is not one per token (special tokens decode
   to nothing, split UTF-8 sequences are held back), so counting chunks would undercount.
"""

import json
import os
import sys

import llama_cpp
import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

EOG_IDS = None  # filled once the model is loaded

_generate = llama_cpp.Llama.generate
_create_completion = llama_cpp.Llama.create_completion


def generate(self, tokens, *args, **kwargs):
    stats = {"prompt_tokens": len(tokens), "generated": 0, "last": None}
    self._bench_stats = stats
    for token in _generate(self, tokens, *args, **kwargs):
        stats["generated"] += 1
        stats["last"] = token
        yield token


def create_completion(self, *args, **kwargs):
    result = _create_completion(self, *args, **kwargs)
    if not kwargs.get("stream"):
        return result

    def stream():
        last = None
        for chunk in result:
            last = chunk
            yield chunk
        stats = getattr(self, "_bench_stats", None)
        if stats is not None and last is not None:
            completion = stats["generated"]
            if stats["last"] is not None and llama_cpp.llama_vocab_is_eog(self._model.vocab, stats["last"]):
                completion -= 1  # the end-of-generation token is not part of the output
            yield {
                "id": last["id"], "object": "text_completion", "created": last["created"], "model": last["model"],
                "choices": [],
                "usage": {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": completion,
                          "total_tokens": stats["prompt_tokens"] + completion},
            }

    return stream()


llama_cpp.Llama.generate = generate
llama_cpp.Llama.create_completion = create_completion


class RewriteBody:
    """ASGI middleware: the request-body rewrites 1 and 2 above, for POST /v1/completions."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/completions"):
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict):
            if data.pop("ignore_eos", False):
                bias = {str(t): -1e9 for t in EOG_IDS or []}
                bias.update(data.get("logit_bias") or {})
                data["logit_bias"] = bias
            data.setdefault("repeat_penalty", 1.0)
            body = json.dumps(data).encode()
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"] + [
                (b"content-length", str(len(body)).encode())
            ]
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def main():
    import argparse

    parser = argparse.ArgumentParser()
    add_args_from_model(parser, Settings)
    args = parser.parse_args()
    server_settings = parse_model_from_args(ServerSettings, args)
    model_settings = [parse_model_from_args(ModelSettings, args)]
    app = create_app(server_settings=server_settings, model_settings=model_settings)

    global EOG_IDS
    from llama_cpp.server import app as app_module

    llama = app_module._llama_proxy(None)
    vocab = llama._model.vocab
    EOG_IDS = [t for t in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
    print(f"end-of-generation tokens: {EOG_IDS}", file=sys.stderr, flush=True)

    uvicorn.run(RewriteBody(app), host=os.getenv("HOST", server_settings.host),
                port=int(os.getenv("PORT", server_settings.port)), log_level="warning")


if __name__ == "__main__":
    main()
