"""This engine against transformers and llama.cpp, same prompts, same process, same machine.

Decoding SmolLM2-135M-Instruct on CPU, greedy, EOS ignored, batch 1 and 8:

* qspec-jax with the GGUF's own Q4_1 codes (``quant="gguf"``): w4a16, w4a8, w4a4 and QSpec
  (W4A8 draft) at the given gammas, plus the float model (``fp``);
* transformers' ``generate`` on the float model (float32, torch's threads), read from the same
  GGUF file (``--no-transformers`` skips it);
* llama.cpp through llama-cpp-python's low-level API on the same Q4_1 file (the optional
  ``compare`` extra: ``pip install -e '.[compare]'``, which builds llama.cpp from source in
  about ten minutes; ``--no-llama-cpp`` skips it). One context with one KV sequence per prompt:
  the prompts are prefilled in one batch and every step decodes one token of every sequence in
  one ``llama_decode`` call; the next token is the argmax of the returned logits (numpy).

Time per step = (wall(--long) - wall(--short)) / (long - short), each wall the median of --reps
calls, so prefill and compilation drop out; the runners alternate within each of --rounds
rounds and the median round is reported. Decode tokens/s = batch / time per step. The ratios
("vs llama.cpp", "vs w4a16") are medians of per-round ratios, so a drift of the shared machine
between rounds cancels. Prompts are
the engine's chat-template token ids, fed as ids to every runner.

llama.cpp's CPU Q4_1 matmul quantizes the activations to 8 bits in blocks of 32 (its Q8_1
``vec_dot_type``), so its arithmetic is closest to this engine's ``w4a8`` with group-32
activation scales, not to ``w4a16``; the table reports how many of llama.cpp's greedy tokens
match each engine mode's (mean matching prefix).

    python -m experiments.bench_compare [--batches 1,8] [--gammas 3] [--rounds 3] [--reps 3]

Writes experiments/results/bench_compare.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from qspec_jax.bench.common import (
    COMPARE_PROMPTS,
    batch_prompts,
    describe,
    int_list,
    left_padded,
    median_wall,
    run_meta,
    usage_error,
    write_json,
)


class LlamaCppRunner:
    """Greedy batched decoding with llama.cpp's C API (one KV sequence per prompt)."""

    def __init__(self, path: str, n_seq: int, ctx_per_seq: int, threads: int):
        import llama_cpp as L
        import llama_cpp._logger as llama_logger

        llama_logger.set_verbose(False)  # llama.cpp's load / graph messages: errors only
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_seq_max = n_seq
        cp.n_ctx = n_seq * ctx_per_seq
        cp.n_batch = cp.n_ubatch = max(512, n_seq * ctx_per_seq)
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cp.n_batch, 0, n_seq)
        self.capacity = cp.n_batch

    def _fill(self, entries) -> None:
        """entries: (token, position, sequence, wants_logits) tuples, one per batch slot."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        b.n_tokens = len(entries)

    def _argmax(self, slot: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, slot)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def generate(self, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        entries, last = [], []
        for s, toks in enumerate(ids):
            for p, t in enumerate(toks):
                entries.append((t, p, s, p == len(toks) - 1))
            last.append(len(entries) - 1)
        if len(entries) > self.capacity:
            raise ValueError(f"{len(entries)} prompt tokens exceed the batch of {self.capacity}")
        self._fill(entries)
        if L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed on the prompts")
        out = [[self._argmax(i)] for i in last]
        for step in range(1, new_tokens):
            self._fill(
                [(o[-1], len(t) + step - 1, s, True) for s, (t, o) in enumerate(zip(ids, out))]
            )
            if L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            for s, o in enumerate(out):
                o.append(self._argmax(s))
        return out

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gammas", default="3", help="QSpec draft lengths (W4A8 draft)")
    ap.add_argument("--modes", default="fp,w4a16,w4a8,w4a4", help="autoregressive engine modes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="calls per length per round (median)")
    ap.add_argument("--short", type=int, default=9)
    ap.add_argument("--long", type=int, default=41)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--out", default="experiments/results/bench_compare.json")
    args = ap.parse_args()
    try:
        batches, gammas = int_list(args.batches), int_list(args.gammas)
        modes = [m for m in args.modes.split(",") if m]
        if min(batches) < 1 or min(gammas, default=1) < 1 or min(args.rounds, args.reps) < 1:
            raise ValueError
        if not 1 <= args.short < args.long:
            raise ValueError
    except ValueError:
        return usage_error(
            "--batches/--gammas take comma-separated positive integers, --rounds/--reps "
            "are positive and 1 <= --short < --long"
        )
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return usage_error(
                "llama-cpp-python is not installed; install the compare extra "
                "(pip install -e '.[compare]') or pass --no-llama-cpp"
            )

    import qspec_jax
    from qspec_jax.loading import embedded_gguf_path

    path = embedded_gguf_path()
    q = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
    fp = qspec_jax.load("smollm2-135m", progress=False) if "fp" in modes else None
    hf = torch = None
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        ).eval()
    pad = q.config.pad_token_id
    n_short, n_long = args.short, args.long

    rows = []
    t_start = time.time()
    for b in batches:
        ids = q.encode(batch_prompts(COMPARE_PROMPTS, b), chat=True)
        runners: dict[str, object] = {}
        for m in modes:
            eng = fp if m == "fp" else q
            runners[m] = lambda n, eng=eng, m=m, ids=ids: (
                eng.generate(ids, mode=m, max_new_tokens=n, ignore_eos=True).tokens
            )
        for g in gammas:
            runners[f"qspec g{g}"] = lambda n, g=g, ids=ids: (
                q.generate(
                    ids, mode="qspec", gamma=g, draft="w4a8", max_new_tokens=n, ignore_eos=True
                ).tokens
            )
        if hf is not None:
            x, mask, longest = left_padded(ids, pad)  # [b, longest] each

            def hf_run(n, x=x, mask=mask, longest=longest):
                with torch.no_grad():
                    out = hf.generate(
                        x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=pad,
                    )  # fmt: skip
                return out[:, longest:].tolist()

            runners["transformers fp32"] = hf_run
        llama = None
        if not args.no_llama_cpp:
            llama = LlamaCppRunner(path, b, max(len(i) for i in ids) + n_long + 8, args.threads)
            runners["llama.cpp Q4_1"] = lambda n, llama=llama, ids=ids: llama.generate(ids, n)

        tokens = {name: fn(n_long) for name, fn in runners.items()}  # warm-up / compile
        for fn in runners.values():
            fn(n_short)
        per_round: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, fn in runners.items():  # alternating: drifts hit every runner
                walls = {
                    n: median_wall(lambda fn=fn, n=n: fn(n), args.reps) for n in (n_short, n_long)
                }
                per_round[name].append((walls[n_long] - walls[n_short]) / (n_long - n_short))
        ref = tokens.get("w4a16")
        base_runs = per_round.get("w4a16")
        for name in runners:
            ms = statistics.median(per_round[name]) * 1e3
            row = dict(
                batch=b,
                runner=name,
                ms_per_step=ms,
                decode_tokens_per_s=b * 1e3 / ms,
                rounds_ms=[s * 1e3 for s in per_round[name]],
            )
            if base_runs is not None:  # per-round ratios: robust to a drifting machine
                row["speed_vs_w4a16"] = statistics.median(
                    w / r for w, r in zip(base_runs, per_round[name])
                )
            for m in ("w4a16", "w4a8"):
                if m in tokens and name != m:
                    row[f"prefix_vs_{m}"] = statistics.mean(
                        _prefix(a, c) for a, c in zip(tokens[name], tokens[m])
                    )
            if name.startswith("qspec") and ref is not None:
                row["equals_w4a16"] = tokens[name] == ref
            rows.append(row)
        if llama is not None:
            llama.close()

    meta = run_meta(
        t_start,
        torch_threads=torch.get_num_threads() if torch is not None else None,
        llama_cpp=None if args.no_llama_cpp else __import__("llama_cpp").__version__,
        llama_threads=None if args.no_llama_cpp else args.threads,
        short=n_short,
        long=n_long,
        rounds=args.rounds,
        reps=args.reps,
    )
    write_json(args.out, dict(meta=meta, rows=rows))
    print(f"\n{describe(meta)}\n")
    print(
        "| batch | runner | ms / step | decode tokens/s | vs llama.cpp | vs w4a16 | "
        "prefix = w4a16 | prefix = w4a8 | QSpec == W4A16 |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        base = next(
            (x for x in rows if x["batch"] == r["batch"] and x["runner"] == "llama.cpp Q4_1"), None
        )
        vs = (
            f"{statistics.median(x / y for x, y in zip(base['rounds_ms'], r['rounds_ms'])):.2f}x"
            if base
            else ""
        )
        v16 = f"{r['speed_vs_w4a16']:.2f}x" if "speed_vs_w4a16" in r else ""
        p16 = f"{r['prefix_vs_w4a16']:.1f}" if "prefix_vs_w4a16" in r else ""
        p8 = f"{r['prefix_vs_w4a8']:.1f}" if "prefix_vs_w4a8" in r else ""
        eq = {True: "yes", False: "NO"}.get(r.get("equals_w4a16"), "")
        print(
            f"| {r['batch']} | {r['runner']} | {r['ms_per_step']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {vs} | {v16} | {p16} | {p8} | {eq} |"
        )
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
