#!/usr/bin/env python3
"""Runs llama.cpp's convert_hf_to_gguf.py on an epserve benchmark checkpoint (used by bench/compare.sh).

Usage: convert_gguf.py LLAMA_CPP_DIR -- CONVERTER_ARGS...

The one workaround, applied in this process only (no file of llama.cpp is changed): the converter
names a BPE pre-tokenizer by hashing the token ids of a test string (`get_vocab_base_pre`) and refuses
hashes it does not know. The synthetic tokenizer `epserve gen-model` writes is byte-level BPE whose
tokenizer.json pre-tokenizer is `ByteLevel` with `use_regex: true`, i.e. GPT-2's split regex, which is
llama.cpp's "gpt-2" pre-tokenizer. This wrapper checks that the tokenizer.json really is that, then
answers "gpt-2" instead of the hash lookup; anything else is refused with the converter's own error.
"""

import json
import sys
from pathlib import Path


def main():
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit("usage: convert_gguf.py LLAMA_CPP_DIR -- CONVERTER_ARGS...")
    llama_cpp = Path(sys.argv[1]).resolve()
    args = sys.argv[3:]
    model_dir = Path(next(a for a in args if not a.startswith("-")))
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))

    from conversion import base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            tok = json.loads((model_dir / "tokenizer.json").read_text())
            pre = tok.get("pre_tokenizer") or {}
            is_gpt2 = (
                pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                and tok.get("normalizer") is None and tok.get("model", {}).get("type") == "BPE"
            )
            if not is_gpt2:
                raise
            print("convert_gguf.py: unknown pre-tokenizer hash; tokenizer.json is plain byte-level BPE with "
                  "GPT-2's regex, so tokenizer.ggml.pre = \"gpt-2\"", file=sys.stderr)
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py")] + args
    import runpy

    runpy.run_path(str(llama_cpp / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
