"""`edgezmq generate`: tokens from a decoder language model deployed as a pipeline."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgezmq.argtypes import count, float_in, int_in, seconds, seed, window
from edgezmq.cli.args import FMT, UsageError, node_failures, stderr
from edgezmq.generation import MAX_STEP_TOKENS

EPILOG = """examples:
  edgezmq generate plan.yaml --random 16 --prompt-len 8 --max-new-tokens 32
  edgezmq generate plan.yaml --tokens prompts.txt --max-new-tokens 64 --temperature 0.8 --top-k 40 --seed 1
  edgezmq generate plan.yaml --text prompts.txt --tokenizer ./tokenizer --json

Many prompts at once keep every stage busy (continuous batching); --window sets how many
microbatches are in flight (default: the plan's, else 2 per node + 2). Greedy by default: the tokens of
the model's own generate(do_sample=False) on the same weights (docs/generate.md).
"""
MAX_PROMPT_LEN = 1 << 20


def _prompts(args: argparse.Namespace, name: str, vocab: int) -> tuple[list[list[int]], Any]:
    """The prompts as token ids, and the tokenizer (to show text) if there is one."""
    import numpy as np

    from edgezmq.model import text

    if args.random is not None:
        rng = np.random.default_rng(args.seed)
        return [rng.integers(1, vocab, args.prompt_len).tolist() for _ in range(args.random)], None
    if args.tokens is not None:
        path = args.tokens
        try:
            if path.endswith(".npy"):
                a = np.load(path, allow_pickle=False)
                if a.ndim != 2 or a.dtype.kind not in "iu" or 0 in a.shape:
                    raise UsageError(f"--tokens {path}: expected a 2-D integer array (prompts x tokens), got "
                                     f"{a.dtype} {a.shape}")
                return a.tolist(), None
            with open(path, encoding="utf-8") as f:
                rows = [ln.split() for ln in f if ln.strip()]
            return [[int(t) for t in r] for r in rows], None
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--tokens {path}: expected .npy or lines of integer token ids "
                             f"({type(e).__name__}: {e})"[:300]) from None
    try:
        with open(args.text, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--text {args.text}: cannot read ({type(e).__name__}: {e})"[:300]) from None
    try:
        tok = text.load_tokenizer(name, args.tokenizer)
    except text.TextModelError as e:
        raise UsageError(str(e)) from None
    return [tok.encode(ln, add_special_tokens=False) or [0] for ln in lines], tok


@node_failures
def cmd_generate(args: argparse.Namespace) -> int:
    from edgezmq.generation import Generator, Sampling
    from edgezmq.model import text
    from edgezmq.orchestrate.planfile import load_plan

    plan = load_plan(args.plan)
    if not text.is_decoder(plan.model.name):
        raise UsageError(f"{args.plan}: model {plan.model.name} is not a decoder language model (edgezmq generate "
                         f"runs {', '.join(n for n in text.TEXT_MODELS if text.is_decoder(n))})")
    config, _ = text.model_config(plan.model.name, dict(plan.model.kwargs))
    prompts, tok = _prompts(args, plan.model.name, int(config.vocab_size))
    sampling = Sampling(greedy=args.temperature is None, temperature=args.temperature or 1.0,
                        top_k=args.top_k, seed=args.seed)
    out: list[list[int]] = [[] for _ in prompts]
    with Generator.from_plan(plan, window=args.window, timeout=args.timeout, retries=args.retries) as g:
        g.step_tokens = args.step_tokens
        for i, t in g.stream(prompts, args.max_new_tokens, sampling, stop_at_eos=not args.no_eos):
            out[i].append(t)
            if args.stream and not args.json:
                print(f"{i}\t{t}", flush=True)
        st = g.stats
    rate = st.tokens / st.seconds if st.seconds > 0 else 0.0
    rows = [{"prompt": p, "tokens": o, **({"text": tok.decode(o)} if tok is not None else {})}
            for p, o in zip(prompts, out)]
    if args.json:
        print(json.dumps({"sequences": st.sequences, "tokens": st.tokens, "seconds": round(st.seconds, 4),
                          "tokens_per_s": round(rate, 3), "steps": st.steps, "prefill_steps": st.prefill_steps,
                          "resent": st.resent,
                          "cache_full": st.cache_full, "outputs": rows}))
        return 0
    for i, r in enumerate(rows):
        shown = r.get("text") if tok is not None else " ".join(map(str, r["tokens"]))
        print(f"[{i}] {shown}")
    first = sorted(st.first_token_s)
    stderr(f"{st.sequences} sequences, {st.tokens} tokens in {st.seconds:.2f}s ({rate:.2f} tokens/s); "
           f"first token after {first[len(first) // 2]:.2f}s (median)" if first else "no token generated")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate tokens with a deployed decoder language model",
                       epilog=EPILOG, formatter_class=FMT)
    g.add_argument("plan", help="the deployed plan (a decoder: gpt2*, tinyllama_1_1b, llama_3_2_1b, qwen2_5_0_5b, mistral_7b_v0_*)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--random", type=count, metavar="N", help="N random prompts (seeded by --seed)")
    src.add_argument("--tokens", metavar="FILE", help="prompts as token ids: a .npy (prompts x tokens) or a text "
                     "file of whitespace-separated ids, one prompt per line")
    src.add_argument("--text", metavar="FILE", help="prompts as text, one per line (needs a tokenizer)")
    g.add_argument("--tokenizer", metavar="PATH", help="for --text: a tokenizer directory (else the model's "
                   "from the local Hugging Face cache)")
    g.add_argument("--prompt-len", type=int_in(1, MAX_PROMPT_LEN), default=8, help="tokens of each --random prompt")
    g.add_argument("--max-new-tokens", type=int_in(1, 1 << 20), default=32, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float_in(0, 100, lo_open=True), default=None,
                   help="sample at this temperature (default: greedy)")
    g.add_argument("--top-k", type=int_in(0, 1 << 24), default=0, help="sample from the k most likely (0: all)")
    g.add_argument("--seed", type=seed, default=0, help="of --random and of sampling")
    g.add_argument("--no-eos", action="store_true", help="do not stop a sequence at the model's eos token")
    g.add_argument("--window", type=window, default=None, help="microbatches in flight")
    g.add_argument("--step-tokens", type=int_in(1, MAX_STEP_TOKENS), default=None,
                   help="the most prompt tokens one prefill step carries (default: a microbatch of prompt chunks; "
                        "fewer fill the pipeline sooner, at a higher cost per token: docs/generate.md)")
    g.add_argument("--timeout", type=seconds, default=120.0, help="seconds before a step is sent again")
    g.add_argument("--retries", type=int_in(0, 100), default=1, help="resends of a step (0..100)")
    g.add_argument("--stream", action="store_true", help="print each token as it comes (index<TAB>token)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
