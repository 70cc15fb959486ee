"""Quality probe of the weight quantizers on SmolLM2-135M: how often W4A4 / W4A8 pick W4A16's token.

For each weight quantization (method x group size x options) the model is quantized once; then

1. W4A16 greedily continues each prompt for --tokens tokens (the verifier's own output);
2. over prompt + continuation, the argmax of each low-bit precision is compared with W4A16's
   argmax at the positions that predict the continuation tokens, in two ways:
   * "tf": teacher-forced, every position computed in the low-bit precision (the whole history
     in W4A4 / W4A8, the harsher number);
   * "kv16": the history's K/V come from W4A16 (as after QSpec's overwrite) and only the token
     itself runs in the low-bit precision, i.e. the γ = 1 acceptance rate of a QSpec draft.
   Also "w16|fp": agreement of W4A16 with the float model (the weight quantization alone).

Activation settings (group size, clip ratio) do not touch the weights, so each quantized model
is evaluated under every activation setting asked for.

    python -m experiments.quant_probe --methods quarot-rtn,quarot-gptq --group-sizes 32 \
        --act-groups 0,32 --clips 1.0,0.9 --precisions w4a4,w4a8

With ``--text fp`` the teacher-forced text is the float model's greedy continuation instead,
the same for every setting (removes the confound that an easier W4A16 text raises agreement).

``--methods gguf`` evaluates the GGUF file's own Q4_1 codes (asymmetric group 32, kept exactly:
its W4A16 is the shipped model; no rotation, since rotating would re-quantize the weights);
--group-sizes does not apply to it.

One line of results per (weights, activation setting), and with --out a JSON file
{"meta": run metadata, "rows": [one dict per line]}.
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.bench.common import PROBE_PROMPTS, run_meta, write_json
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.config import QuantConfig
from qspec_jax.loading import encode_prompts, load_checkpoint, load_tokenizer
from qspec_jax.model.llama import forward
from qspec_jax.quant import quantize_model
from qspec_jax.quant.calibration import calibration_tokens


def _pad(seqs, length, pad):
    out = np.full((len(seqs), length), pad, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


_FN_CACHE: dict = {}


def _cached(key, make):
    if key not in _FN_CACHE:
        _FN_CACHE[key] = make()
    return _FN_CACHE[key]


def greedy_batch(params, cfg, qcfg, prompts, n_new, precision="w4a16"):
    """Greedy continuations (n_new ids each) of a batch of prompts, right-padded to one length.

    Padded prompt positions write junk K/V beyond each prompt, but every later position is
    written before it becomes visible (causal mask), so the result equals unpadded decoding.
    """
    lens = np.array([len(p) for p in prompts], np.int32)
    p_len = int(lens.max())
    toks = jnp.asarray(_pad(prompts, p_len, cfg.pad_token_id))
    cap = p_len + n_new

    def make_prefill():
        @jax.jit
        def f(params, toks, idx):
            cache = KVCache.init(cfg, toks.shape[0], cap)
            return forward(params, toks, cache, cfg, qcfg, precision, logits_index=idx)

        return f

    def make_step():
        @jax.jit
        def f(params, tok, cache):
            logits, cache = forward(params, tok, cache, cfg, qcfg, precision)
            nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return nxt, cache.replace(lengths=cache.lengths + 1)

        return f

    prefill = _cached(("prefill", cfg, qcfg, precision, toks.shape, cap), make_prefill)
    step = _cached(("step", cfg, qcfg, precision, len(prompts), cap), make_step)
    logits, cache = prefill(params, toks, jnp.asarray(lens - 1))
    tok = jnp.argmax(logits, -1).astype(jnp.int32)  # [b]
    cache = cache.replace(lengths=jnp.asarray(lens))
    out = [tok]
    for _ in range(n_new - 1):
        tok, cache = step(params, tok[:, None], cache)
        out.append(tok)
    return np.stack([np.asarray(t) for t in out], 1).tolist()  # [b, n_new]


def _full_fn(cfg, qcfg, precision, shape, with_kl):
    """Teacher-forced forward of [b, S] from an empty cache.

    Returns (argmax [b, S], log-probs [b, S, V], cache), or with `with_kl` a function of
    (params, toks, ref_logp) returning (argmax [b, S], KL(ref || this) [b, S]).
    """

    def make():
        def run(params, toks):
            cache = KVCache.init(cfg, toks.shape[0], toks.shape[1])
            logits, cache = forward(params, toks, cache, cfg, qcfg, precision)
            return jnp.argmax(logits, -1), jax.nn.log_softmax(logits, -1), cache

        if not with_kl:
            return jax.jit(run)

        @jax.jit
        def f(params, toks, ref_logp):
            am, logp, _ = run(params, toks)
            return am, _kl(ref_logp, logp)

        return f

    return _cached(("full", cfg, qcfg, precision, shape, with_kl), make)


def _kl(ref_logp, logp):
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), -1)


def _kv16_fn(cfg, qcfg, precision, n):
    """Each of n positions alone in `precision`, attending to W4A16 K/V of earlier positions."""

    def make():
        @jax.jit
        def f(params, toks, k16, v16, positions, ref_logp):
            # k16, v16: [L, 1, S, kvh, hd] of one sequence, broadcast to the n probe rows
            k = jnp.broadcast_to(k16, (k16.shape[0], n, *k16.shape[2:]))
            v = jnp.broadcast_to(v16, (v16.shape[0], n, *v16.shape[2:]))
            cache = KVCache(k=k, v=v, lengths=positions)
            logits, _ = forward(params, toks[positions][:, None], cache, cfg, qcfg, precision)
            logits = logits[:, 0]  # [n, V]
            return jnp.argmax(logits, -1), _kl(ref_logp, jax.nn.log_softmax(logits, -1))

        return f

    return _cached(("kv16", cfg, qcfg, precision, n), make)


def evaluate(params, cfg, qcfg, seqs, n_new, act_settings, precisions, fp_params=None):
    """Agreement numbers for one quantized model under each activation setting.

    seqs: list of (prompt + continuation ids, prompt length); every continuation has n_new ids.
    Besides top-1 agreement, the mean KL(W4A16 || low-bit) over the same positions (a smoother
    measure of the same thing, less noisy than agreement for comparing settings).
    """
    s_len = max(len(ids) for ids, _ in seqs)
    toks = jnp.asarray(_pad([ids for ids, _ in seqs], s_len, cfg.pad_token_id))
    starts = [n_prompt - 1 for _, n_prompt in seqs]  # position predicting continuation token 0
    sel = np.zeros((len(seqs), s_len), bool)
    for i, s in enumerate(starts):
        sel[i, s : s + n_new] = True

    am16, logp16, cache16 = _full_fn(cfg, qcfg, "w4a16", toks.shape, False)(params, toks)
    am16 = np.asarray(am16)
    ref = am16[sel]  # [b * n_new], row-major = prompt by prompt
    total = n_new * len(seqs)
    fp_agree = None
    if fp_params is not None:
        am, _, _ = _full_fn(cfg, QuantConfig(), "fp", toks.shape, False)(fp_params, toks)
        fp_agree = float((np.asarray(am)[sel] == ref).mean())
    results = []
    for ag, clip in act_settings:
        q = QuantConfig(
            method=qcfg.method,
            group_size=qcfg.group_size,
            symmetric=qcfg.symmetric,
            rotated=qcfg.rotated,
            act_group_size=ag,
            act_clip_ratio=clip,
        )
        row = {"act_group_size": ag, "act_clip_ratio": clip, "w16_vs_fp": fp_agree}
        for prec in precisions:
            am, kl = _full_fn(cfg, q, prec, toks.shape, True)(params, toks, logp16)
            row[f"{prec}_tf"] = float((np.asarray(am)[sel] == ref).mean())
            row[f"{prec}_tf_kl"] = float(np.asarray(kl)[sel].mean())
            hits, kls = 0, []
            kv16 = _kv16_fn(cfg, q, prec, n_new)
            for i, s in enumerate(starts):
                pos = jnp.arange(s, s + n_new, dtype=jnp.int32)
                am1, kl1 = kv16(
                    params,
                    toks[i],
                    cache16.k[:, i : i + 1],
                    cache16.v[:, i : i + 1],
                    pos,
                    logp16[i, s : s + n_new],
                )
                hits += int((np.asarray(am1) == am16[i, s : s + n_new]).sum())
                kls.append(np.asarray(kl1))
            row[f"{prec}_kv16"] = hits / total
            row[f"{prec}_kv16_kl"] = float(np.concatenate(kls).mean())
        results.append(row)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="quarot-rtn")
    ap.add_argument("--group-sizes", default="32")
    ap.add_argument("--act-groups", default="0,32")
    ap.add_argument("--clips", default="1.0")
    ap.add_argument("--precisions", default="w4a4,w4a8")
    ap.add_argument("--asym", action="store_true", help="asymmetric weights")
    ap.add_argument("--clip-search", default="1", help="weight clip search: 0, 1 or 0,1")
    ap.add_argument("--randomized", default="0", help="randomized Hadamard: 0, 1 or 0,1")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--calib-seqs", type=int, default=0, help="0 = all windows")
    ap.add_argument("--tokens", type=int, default=64, help="greedy W4A16 tokens per prompt")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp", action="store_true", help="also W4A16-vs-fp agreement")
    ap.add_argument(
        "--text",
        choices=("w4a16", "fp"),
        default="w4a16",
        help="whose greedy continuations are teacher-forced: each quantized model's own W4A16 "
        "(what QSpec sees) or the float model's, shared by every setting (a fixed text, so "
        "settings are compared on the same tokens)",
    )
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="weight group size")

    t0 = time.time()
    cfg, fp_params, _ = load_checkpoint("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    prompts = encode_prompts(tok, list(PROBE_PROMPTS[: args.prompts]), chat=True)
    calib = calibration_tokens(tok, args.calib_seq_len, args.calib_seqs or None)
    print(f"loaded in {time.time() - t0:.1f}s; calibration {calib.shape}", flush=True)
    act_settings = [
        (int(a), float(c))
        for a, c in itertools.product(args.act_groups.split(","), args.clips.split(","))
    ]
    precisions = args.precisions.split(",")
    all_rows = []
    fp_conts = None
    if args.text == "fp":
        fp_conts = greedy_batch(fp_params, cfg, QuantConfig(), prompts, args.tokens, "fp")
    for method, gs, cs, rnd in itertools.product(
        args.methods.split(","),
        [int(g) for g in args.group_sizes.split(",")],
        [bool(int(v)) for v in args.clip_search.split(",")],
        [bool(int(v)) for v in args.randomized.split(",")],
    ):
        if rnd and not method.startswith("quarot"):
            continue
        t1 = time.time()
        if method == "gguf":  # the file's own Q4_1 codes, kept exactly (no rotation possible)
            _, params, qcfg = load_checkpoint("smollm2-135m", keep_int4=True)
        else:
            params, qcfg = quantize_model(
                fp_params,
                cfg,
                method,
                gs,
                calib_tokens=calib,
                symmetric=not args.asym,
                seed=args.seed,
                progress=False,
                randomized_hadamard=rnd,
                clip_search=cs,
                act_order=args.act_order,
                percdamp=args.percdamp,
            )
        tq = time.time() - t1
        print(f"  quantized {method} g{gs} in {tq:.0f}s", flush=True)
        t2 = time.time()
        if fp_conts is None:
            conts = greedy_batch(params, cfg, qcfg, prompts, args.tokens)
            print(f"  W4A16 greedy in {time.time() - t2:.0f}s", flush=True)
        else:
            conts = fp_conts
        seqs = [(ids + c, len(ids)) for ids, c in zip(prompts, conts)]
        rows = evaluate(
            params,
            cfg,
            qcfg,
            seqs,
            args.tokens,
            act_settings,
            precisions,
            fp_params if args.fp else None,
        )
        tag = (
            f"{method} g{gs}{' asym' if args.asym else ''}{' clipsearch' if cs else ''}"
            f"{' randH' if rnd else ''}{' actorder' if args.act_order else ''}"
        )
        for row in rows:
            row.update(
                method=method,
                group_size=gs,
                clip_search=cs,
                randomized=rnd,
                asym=args.asym,
                act_order=args.act_order,
                quant_s=round(tq, 1),
            )
            nums = " ".join(
                f"{k}={v:.3f}"
                for k, v in row.items()
                if k.startswith(("w4a", "w16")) and v is not None
            )
            print(
                f"{tag} | act_g={row['act_group_size']} clip={row['act_clip_ratio']} | "
                f"{nums} | quant {tq:.0f}s, total {time.time() - t1:.0f}s",
                flush=True,
            )
        all_rows += rows
    if args.out:
        write_json(args.out, dict(meta=run_meta(t0, settings=vars(args)), rows=all_rows))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
