"""The `qspec-jax` command line.

Subcommands:
    generate   generate text from prompts with any decoding method (--mode: fp, w4a16, w4a4,
               w4a8, qspec, quantspec, hspec)
    demo       QSpec next to W4A16 autoregressive on the embedded model (what `make run` runs)
    quantize   quantize once and write an orbax checkpoint under checkpoints/
    eval       score modes on math word problems, HumanEval pass@1 or held-out perplexity

Bad input prints one line to stderr and exits with status 2; nothing is half written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from qspec_jax.cache.protocol import KV_FORMATS
from qspec_jax.config import DRAFT_PRECISIONS
from qspec_jax.decoding import methods

EXIT_USAGE = 2

DEMO_PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "A train travels 60 km per hour for 3 hours. How far does it go?",
]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit status 2."""

    def error(self, message):  # noqa: D401
        raise CliError(f"{self.prog}: {message} (see --help)")


class CliError(Exception):
    """A usage problem reported as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from qspec_jax.engine import QUANT_METHODS  # noqa: PLC0415

    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (embedded), a preset, a .gguf file, an HF dir or a checkpoint",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=QUANT_METHODS,
        help="weight quantization applied at load (default: none, or the mode's need)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="weight group size for the quantizer (0 = per channel)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="float weights, activations and KV cache (default: bfloat16 on a GPU, "
        "float32 on CPU)",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=None,
        help="shard over this many devices (data x model parallel; default: no mesh)",
    )
    p.add_argument(
        "--model-parallel",
        type=int,
        default=1,
        help="of --devices, how many form the tensor-parallel axis",
    )
    p.add_argument(
        "--no-quant-cache",
        action="store_true",
        help="quantize (and convert the tokenizer) anew instead of reusing the copy "
        "cached under ~/.cache/qspec-jax (also QSPEC_JAX_QUANT_CACHE=0)",
    )


def _mesh(args):
    if args.devices is None:
        if args.model_parallel != 1:
            raise CliError("--model-parallel needs --devices")
        return None
    from qspec_jax.sharding import make_mesh  # noqa: PLC0415

    try:
        return make_mesh(args.devices, args.model_parallel)
    except ValueError as e:
        raise CliError(str(e)) from None


def _read_prompts_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise CliError(f"prompts file {path} does not exist: give a .jsonl file")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(
                    f"{path} line {n} is not valid JSON ({e.msg}): one object per line"
                ) from None
            if isinstance(obj, str):
                prompts.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                prompts.append(obj["prompt"])
            else:
                raise CliError(f'{path} line {n} has no "prompt" string: write {{"prompt": "..."}}')
    if not prompts:
        raise CliError(f"prompts file {path} holds no prompts")
    return prompts


def _default_quant(mode: str, quant: str | None, model: str = "smollm2-135m") -> str | None:
    """The measured best weights for a mode when --quant is not given: float for fp; for a GGUF
    model its own 4-bit codes (W4A16 is then the shipped model exactly, README "Quantization");
    otherwise quarot-rtn."""
    if quant is not None:
        return quant
    if mode == "fp":
        return None
    return "gguf" if model == "smollm2-135m" or str(model).endswith(".gguf") else "quarot-rtn"


# API words in a method's message -> the CLI's flags
_FLAG_WORDS = ((r"kv_cache='(\w+)'", r"--kv-cache \1"), (r"\bkv_residual\b", "--kv-residual"))


def _cli_words(message: str) -> str:
    for pattern, repl in _FLAG_WORDS:
        message = re.sub(pattern, repl, message)
    return message


def _method(args):
    """The decoding method of --mode with the flags it takes (tree, levels, gamma, draft)."""
    cls = methods.method_class(args.mode)
    opts = {
        k: getattr(args, k)
        for k in cls.option_names()
        if getattr(args, k, None) is not None  # unset flags: the method's own default
    }
    try:
        method = methods.from_mode(args.mode, **opts)
        method.check_cache(args.kv_cache or method.default_kv_cache, args.kv_residual)
    except ValueError as e:
        given = [f"--{k}" for k in opts if k in ("tree", "levels")]
        prefix = f"{'/'.join(given)}: " if given and "kv" not in str(e) else ""
        raise CliError(prefix + _cli_words(str(e))) from None
    return method


def cmd_generate(args) -> int:
    from qspec_jax.engine import load  # noqa: PLC0415

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += _read_prompts_file(args.prompts_file)
    if not prompts:
        raise CliError("no prompts: give --prompt TEXT or --prompts-file F.jsonl")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.kv_residual < 1:
        raise CliError(f"--kv-residual must be >= 1, got {args.kv_residual}")
    method = _method(args)  # checked before the model is loaded
    engine = load(
        args.model,
        quant=_default_quant(args.mode, args.quant, args.model),
        group_size=args.group_size,
        dtype=args.dtype,
        progress=not args.json,
        mesh=_mesh(args),
        quant_cache=not args.no_quant_cache,
    )
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        stop=args.stop,
        kv_cache=args.kv_cache,
        kv_residual=args.kv_residual,
    )
    if args.stream:
        return _stream(engine, prompts, method, kw)
    res = engine.generate(prompts, method, **kw)
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        for i, text in enumerate(res.texts):
            print(f"--- [{i}] ({res.finish_reasons[i]}, {len(res.tokens[i])} tokens)")
            print(text)
        s = res.stats
        line = f"--- {s['tokens_generated']} tokens in {s['wall_s']:.2f}s = {s['tokens_per_s']:.1f} tokens/s ({args.mode})"
        if "acceptance_rate" in s:
            line += f"{', draft ' + s['draft'] if 'draft' in s else ''}, acceptance {s['acceptance_rate']:.2f}"
        if "tree_nodes" in s:
            line += (f", tree {args.tree} ({s['tree_nodes']} nodes), levels {','.join(s['levels'])}, "
                     f"{s['tree_accepted_per_step']:.2f} tree tokens kept/step")
        if "mean_tokens_per_step" in s:
            line += f", {s['mean_tokens_per_step']:.2f} tokens/step"
        line += f", {s['kv_cache']} KV {s['kv_bytes_per_token'] / 1024:.1f} KiB/token"
        print(line)
    return 0


def _stream(engine, prompts, method, kw) -> int:
    """Prints each prompt's text as it is generated (prefixed by [i] with several prompts)."""
    many = len(prompts) > 1
    for ev in engine.stream(prompts, method, **kw):
        if ev.text:
            sys.stdout.write(f"[{ev.index}] {ev.text}\n" if many else ev.text)
            sys.stdout.flush()
        if ev.finish_reason:
            sys.stdout.write(f"{'' if many else chr(10)}--- [{ev.index}] {ev.finish_reason}\n")
    return 0


def cmd_demo(args) -> int:
    from qspec_jax.engine import load  # noqa: PLC0415

    quant = _default_quant("qspec", args.quant, args.model)
    print(f"Loading {args.model} with int4 weights: {quant} ...")
    engine = load(
        args.model,
        quant=quant,
        group_size=args.group_size,
        dtype=args.dtype,
        mesh=_mesh(args),
        quant_cache=not args.no_quant_cache,
    )
    info = engine.load_info
    how = {
        None: "loaded",
        "hit": "reused the cached quantized weights",
        "written": "quantized and cached",
        "invalid": "cached copy failed validation: quantized again and re-cached",
    }
    print(
        f"... {how.get(info.get('quant_cache'), 'quantized')} in {info.get('load_s', 0):.1f}s"
        + (f" ({info['quant_cache_path']})" if "quant_cache_path" in info else "")
    )
    prompts = DEMO_PROMPTS[: args.num_prompts]
    kw = dict(max_new_tokens=args.max_new_tokens, chat=True)
    rows = []
    for mode in ("w4a16", args.draft, "qspec"):  # the verifier, the drafter alone, QSpec
        engine.generate(prompts, mode=mode, gamma=args.gamma, draft=args.draft, **kw)  # compile
        res = engine.generate(prompts, mode=mode, gamma=args.gamma, draft=args.draft, **kw)
        rows.append((mode, res))
    base = rows[0][1]
    for i, p in enumerate(prompts):
        print(f"\n=== prompt {i}: {p}")
        for mode, res in rows:
            print(f"--- {mode}: {res.texts[i]!r}")
    print(
        f"\n{'mode':<8} {'tokens/s':>9} {'vs w4a16':>9} {'same tokens as w4a16':>21} {'acceptance':>11}"
    )
    for mode, res in rows:
        same = sum(a == b for a, b in zip(res.tokens, base.tokens))
        acc = res.stats.get("acceptance_rate")
        print(
            f"{mode:<8} {res.stats['tokens_per_s']:>9.1f} "
            f"{res.stats['tokens_per_s'] / base.stats['tokens_per_s']:>8.2f}x "
            f"{same:>12}/{len(prompts):<8} {'' if acc is None else f'{acc:.2f}':>11}"
        )
    print(
        f"(batch {len(prompts)}, {args.max_new_tokens} new tokens, gamma {args.gamma}, draft {args.draft}, "
        f"weights {engine.weight_bytes / 2**20:.1f} MiB, one int4 copy for every mode)"
    )
    return 0


def cmd_quantize(args) -> int:
    from qspec_jax.engine import quantize_to_checkpoint  # noqa: PLC0415

    path = quantize_to_checkpoint(
        args.model,
        args.method,
        args.out,
        group_size=args.group_size,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(f"wrote {path}; load it with qspec_jax.load({path!r}) or --model {path}")
    return 0


def cmd_eval(args) -> int:
    from qspec_jax.engine import load  # noqa: PLC0415
    from qspec_jax.eval import EvalUsageError, check_eval_args, markdown_table, run_eval  # noqa: PLC0415

    limit = None if args.limit == 0 else args.limit
    try:  # every argument checked before the model is loaded
        check_eval_args(args.task, args.modes, limit, args.max_new_tokens, args.gamma, args.out)
        engine = load(
            args.model,
            quant=_default_quant("w4a16" if args.modes != "fp" else "fp", args.quant, args.model),
            group_size=args.group_size,
            dtype=args.dtype,
            mesh=_mesh(args),
            quant_cache=not args.no_quant_cache,
        )
        summary = run_eval(
            engine, args.task, args.modes, limit, args.max_new_tokens, args.gamma, args.out,
            draft=args.draft,
        )
    except EvalUsageError as e:
        raise CliError(str(e)) from None
    print(markdown_table(summary))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qspec-jax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate from prompts")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts-file", help='a .jsonl file of {"prompt": ...} objects')
    g.add_argument("--mode", default="fp", choices=methods.mode_names(),
                   help="decoding method: " + "; ".join(
                       f"{c.name}: {c.summary}" for c in methods.REGISTRY.values()))
    g.add_argument("--gamma", type=int, default=3, help="draft length (qspec, quantspec)")
    g.add_argument("--draft", default=None, choices=DRAFT_PRECISIONS,
                   help="draft precision over the same int4 weights (qspec default: w4a8)")
    g.add_argument("--tree", default="4,2,1",
                   help="hspec draft tree: children per node at each depth, e.g. 4,2,1")
    g.add_argument("--levels", default="w4a4,w4a8,w4a16",
                   help="hspec precisions, cheapest first, ending in w4a16 (e.g. w4a4,w4a16)")
    g.add_argument("--kv-cache", default=None, choices=KV_FORMATS,
                   help="KV cache format: float, or hier (QuantSpec int4/int8 + float buffer; "
                        "default hier for quantspec, float otherwise)")
    g.add_argument("--kv-residual", type=int, default=128,
                   help="R of the hier cache: float buffer of up to 2R recent tokens")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--stop", action="append", default=None,
                   help="a stop string (repeatable): generation ends before it")
    g.add_argument("--stream", action="store_true", help="print the text as it is generated")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="QSpec vs W4A16 on the embedded model")
    _add_model_args(d)
    d.add_argument("--gamma", type=int, default=3)
    d.add_argument("--draft", default="w4a8", choices=DRAFT_PRECISIONS,
                   help="QSpec draft precision over the same int4 weights")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--num-prompts", type=int, default=4)
    d.set_defaults(func=cmd_demo)

    from qspec_jax.engine import QUANT_METHODS  # noqa: PLC0415

    q = sub.add_parser("quantize", help="quantize once and write an orbax checkpoint")
    q.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m, a .gguf file or an HF dir"
    )
    q.add_argument("--method", required=True, choices=[m for m in QUANT_METHODS if m != "none"])
    q.add_argument(
        "--group-size", type=int, default=128, help="weight group size (0 = per channel)"
    )
    q.add_argument(
        "--out", required=True, help="checkpoint directory to create, e.g. checkpoints/NAME"
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="score modes on math word problems, HumanEval or perplexity")
    _add_model_args(e)
    e.add_argument("--task", required=True, choices=("math", "humaneval", "perplexity"))
    e.add_argument("--modes", default="w4a16,w4a4,qspec", help="comma-separated modes")
    e.add_argument("--limit", type=int, default=8, help="first N items (0 = all)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--gamma", type=int, default=3)
    e.add_argument(
        "--draft",
        default="w4a8",
        choices=DRAFT_PRECISIONS,
        help="QSpec draft precision over the same int4 weights",
    )
    e.add_argument(
        "--out", default="experiments/results/eval.json", help="summary JSON (resumable)"
    )
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    from qspec_jax.engine import UsageError  # noqa: PLC0415
    from qspec_jax.loading.errors import LoadError  # noqa: PLC0415

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            raise CliError("qspec-jax: give a command: generate, demo, quantize, eval (see --help)")
        return args.func(args)
    except (CliError, UsageError, LoadError) as e:
        print(f"error: {e}" if not str(e).startswith("qspec-jax") else str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
