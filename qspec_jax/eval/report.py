"""Reporting a summary from `run_eval` / `merge_results`: a markdown table and a bar plot."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_table", "plot_summary"]


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown_table(summary: dict) -> str:
    """A markdown table (one row per mode) plus a line of QSpec comparisons, for the README."""
    cfg, res, comp = summary["config"], summary["results"], summary["comparisons"]
    task = cfg["task"]
    score_name = next((r["score_name"] for r in res.values()), "score")
    gen = task != "perplexity"
    head = ["mode", score_name, "items"]
    head += ["new tokens", "tokens/s", "acceptance", "tokens/step"] if gen else ["tokens scored", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for mode, r in res.items():
        score = r["score"]
        if gen:
            s = "-" if score is None else f"{score:.3f} ({r['n_correct']}/{r['n_items']})"
            row = [mode, s, str(r["n_items"]), _fmt(r["tokens_generated"]),
                   _fmt(r["tokens_per_s"], ".1f"), _fmt(r.get("acceptance_rate")),
                   _fmt(r.get("mean_tokens_per_step"), ".2f")]
        else:
            name = mode if r.get("precision", mode) == mode else f"{mode} (= {r['precision']})"
            row = [name, _fmt(score, ".3f"), str(r["n_items"]), _fmt(r["tokens_scored"]),
                   _fmt(r["tokens_per_s"], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    if comp.get("qspec_equals_w4a16_tokens") is not None:
        notes.append(f"QSpec tokens equal W4A16 tokens on {comp['qspec_equals_w4a16_items']} items "
                     f"({comp['qspec_equals_w4a16_tokens']:.3f})")
        if comp.get("qspec_greedy_equality_violated"):
            notes.append("WARNING: greedy QSpec must equal W4A16 on every item, this is a bug "
                         f"(items {', '.join(comp.get('qspec_mismatch_ids', []))})")
    if comp.get("qspec_speedup_vs_w4a16") is not None:
        notes.append(f"QSpec/W4A16 tokens/s {comp['qspec_speedup_vs_w4a16']:.2f}x")
    if comp.get("recovered") is not None:
        notes.append(f"recovered {comp['recovered']:.3f} of the W4A4 -> W4A16 gap")
    eng = cfg.get("engine", {})
    q = eng.get("quant") or {}
    qdesc = q.get("method", "?") if isinstance(q, dict) else str(q)
    if isinstance(q, dict) and q.get("group_size") is not None:
        qdesc += f", group {q['group_size']}"
    setup = [f"task {task}", f"model {eng.get('source', '?')}", f"quant {qdesc}"]
    if gen:
        setup += [f"max {cfg.get('max_new_tokens')} new tokens", f"gamma {cfg.get('gamma')}",
                  f"temperature {cfg.get('temperature')}"]
    else:
        setup.append(f"chunks of {cfg.get('seq_len')} tokens")
    text = "\n".join(lines) + "\n\n" + "; ".join(setup) + "."
    if notes:
        text += " " + "; ".join(notes) + "."
    return text


def plot_summary(summary: dict, png_path: str) -> None:
    """A bar plot of the score per mode (QSpec bar annotated with acceptance), saved as PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg, res = summary["config"], summary["results"]
    modes = list(res)
    scores = [res[m]["score"] if res[m]["score"] is not None else 0.0 for m in modes]
    score_name = next((r["score_name"] for r in res.values()), "score")
    fig, ax = plt.subplots(figsize=(1.4 * len(modes) + 2.5, 3.6))
    colors = {"fp": "#7f7f7f", "w4a16": "#1f77b4", "w4a4": "#d62728", "w4a8": "#ff7f0e", "qspec": "#2ca02c"}
    bars = ax.bar(modes, scores, color=[colors.get(m, "#9467bd") for m in modes])
    top = max(scores + [1e-9])
    for b, m, s in zip(bars, modes, scores):
        r = res[m]
        label = f"{s:.3f}"
        if r.get("acceptance_rate") is not None:
            label += f"\nacc {r['acceptance_rate']:.2f}"
            if r.get("mean_tokens_per_step") is not None:
                label += f", {r['mean_tokens_per_step']:.2f} tok/step"
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02 * top, label,
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, top * 1.35 if score_name == "perplexity" else max(1.0, top * 1.3))
    ax.set_ylabel(score_name)
    n = max((r["n_items"] for r in res.values()), default=0)
    q = cfg.get("engine", {}).get("quant")
    qname = q.get("method") if isinstance(q, dict) else q
    ax.set_title(f"{cfg['task']} ({n} items) per mode" + (f", weights {qname}" if qname else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
