#!/usr/bin/env python3
"""Hugging Face transformers on an epserve benchmark checkpoint, in process (used by bench/compare.sh).

Loads the text model of a hub-layout Llama-4 checkpoint (`Llama4ForConditionalGeneration`-style
config.json with `text_config`, `language_model.*` weights) as `Llama4ForCausalLM`, in float32 with
eager attention, and measures with `generate()` (greedy; every output forced to exactly N tokens with
`min_new_tokens == max_new_tokens`):

- output tokens/s at batch 1 (requests one after the other) and at batch B (B prompts left-padded into
  one `generate()` call, `--batch-requests` prompts in all);
- time to first token for a long prompt at batch 1: the wall time of `generate(max_new_tokens=1)`
  (prefill plus the first token), p50 over `--ttft-requests` prompts.

Prompts are token ids read from `--prompts` (JSONL `{"prompt": "..."}` lines, tokenized here with the
checkpoint's tokenizer.json, with BOS) so that the prompts are the ones the HTTP servers are sent.

Prints one JSON object. `--check-golden DIR` instead compares the logits of a fixture checkpoint with
its golden file (a check that this loading path is the reference one) and exits.
"""

import argparse
import json
import os
import statistics
import sys
import time


def log(msg):
    print(f"[transformers] {msg}", file=sys.stderr, flush=True)


def load(model_dir, threads):
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.set_num_threads(threads)
    raw = json.load(open(os.path.join(model_dir, "config.json")))
    text = dict(raw.get("text_config", raw))
    # Release-era hub files write `attn_temperature_tuning: 4` (an int meaning "on"); this
    # transformers' strict config wants a bool.
    if isinstance(text.get("attn_temperature_tuning"), int):
        text["attn_temperature_tuning"] = bool(text["attn_temperature_tuning"])
    text.pop("model_type", None)
    text_config = Llama4TextConfig(**text)
    started = time.time()
    # The checkpoint keys are `language_model.model.*` / `language_model.lm_head.*`:
    # Llama4ForCausalLM's base_model_prefix is `language_model`, so from_pretrained maps them.
    model, info = Llama4ForCausalLM.from_pretrained(
        model_dir, config=text_config, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    if info.get("missing_keys"):
        raise RuntimeError(f"weights missing from the checkpoint for Llama4ForCausalLM: {sorted(info['missing_keys'])[:8]}")
    model.eval()
    log(f"loaded in {time.time() - started:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{model.config._attn_implementation} attention, {torch.get_num_threads()} threads)")
    return model, text_config


def check_golden(model_dir, threads):
    import torch

    model, _ = load(model_dir, threads)
    golden = json.load(open(os.path.join(model_dir, "golden", "text.json")))
    worst = 0.0
    for case in golden["cases"]:
        ids = torch.tensor([case["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0]
        diff = (logits - torch.tensor(case["logits"])).abs().max().item()
        worst = max(worst, diff)
    ok = worst < 1e-3
    print(json.dumps({"max_abs_logit_diff": worst, "ok": ok}))
    sys.exit(0 if ok else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prompts", help="JSONL prompts for the throughput runs")
    ap.add_argument("--ttft-prompts", help="JSONL prompts for the TTFT run")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--c1-requests", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-requests", type=int, default=64)
    ap.add_argument("--ttft-requests", type=int, default=4)
    ap.add_argument("--greedy-tokens", type=int, default=16,
                    help="also report this many greedy tokens for prompt --greedy-index (a same-model check)")
    ap.add_argument("--greedy-index", type=int, default=0, help="line of --prompts used by the same-model check")
    ap.add_argument("--check-golden", action="store_true")
    args = ap.parse_args()
    if args.check_golden:
        check_golden(args.model, args.threads)

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model, text_config = load(args.model, args.threads)
    eos = text_config.eos_token_id
    pad = text_config.pad_token_id if text_config.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)

    def read(path, n):
        lines = [json.loads(l)["prompt"] for l in open(path) if l.strip()]
        return [tokenizer(lines[i % len(lines)])["input_ids"] for i in range(n)]

    def generate(batch_ids, new_tokens):
        width = max(len(p) for p in batch_ids)
        input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, p in enumerate(batch_ids):  # left padding
            input_ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=eos,
            )
        produced = out.shape[1] - width
        if produced != new_tokens:
            raise RuntimeError(f"generate() returned {produced} new tokens, asked for {new_tokens}")
        return len(batch_ids) * produced

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "output_len": args.output_len}
    prompts = read(args.prompts, max(args.c1_requests, args.batch_requests, args.greedy_index) + 1)
    result["prompt_tokens"] = len(prompts[0])
    log("warm-up")
    generate([prompts[-1]], 4)

    log(f"batch 1: {args.c1_requests} requests x {args.output_len} tokens")
    started = time.perf_counter()
    tokens = sum(generate([p], args.output_len) for p in prompts[: args.c1_requests])
    secs = time.perf_counter() - started
    result["c1"] = {"requests": args.c1_requests, "output_tokens": tokens, "seconds": secs, "output_tokens_per_s": tokens / secs}
    log(f"batch 1: {tokens / secs:.1f} tokens/s")

    batches = max(1, args.batch_requests // args.batch)
    log(f"batch {args.batch}: {batches} generate() calls x {args.batch} prompts x {args.output_len} tokens")
    started = time.perf_counter()
    tokens = sum(generate(prompts[b * args.batch:(b + 1) * args.batch], args.output_len) for b in range(batches))
    secs = time.perf_counter() - started
    result["c32"] = {"batch": args.batch, "requests": batches * args.batch, "output_tokens": tokens, "seconds": secs,
                     "output_tokens_per_s": tokens / secs}
    log(f"batch {args.batch}: {tokens / secs:.1f} tokens/s")

    long_prompts = read(args.ttft_prompts, args.ttft_requests)
    log(f"TTFT: {args.ttft_requests} prompts of {len(long_prompts[0])} tokens, generate(max_new_tokens=1)")
    ttfts = []
    for p in long_prompts:
        started = time.perf_counter()
        generate([p], 1)
        ttfts.append((time.perf_counter() - started) * 1e3)
    result["ttft"] = {"prompt_tokens": len(long_prompts[0]), "requests": len(ttfts), "p50_ms": statistics.median(ttfts),
                      "all_ms": ttfts}
    log(f"TTFT p50 {statistics.median(ttfts):.0f} ms")

    if args.greedy_tokens:
        ids = torch.tensor([prompts[args.greedy_index]])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.greedy_tokens, min_new_tokens=args.greedy_tokens,
                                 pad_token_id=pad, eos_token_id=eos)
        result["greedy"] = out[0, ids.shape[1]:].tolist()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
