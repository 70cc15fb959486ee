"""The float model against transformers' Llama loaded from the same GGUF (a reference nobody here wrote)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.real

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Write a short story about a robot who learns to paint. Use at least five sentences.",
    "Explain step by step how to compute 17 * 23 without a calculator.",
    "def quicksort(arr):\n    \"\"\"Sort a list of integers and return the sorted list.\"\"\"\n",
]


def test_logits_match_transformers(smollm2_fp, hf_smollm2):
    """Relative L2 error of the logits <= 1e-4 (float32 both sides).

    Both compute the same float32 math from the same dequantized weights; only the summation
    order of the matmuls differs, which gives ~1e-6 relative (measured 2.4e-6 on a chat prompt).
    1e-4 leaves room for longer prompts without hiding a real bug (a wrong RoPE, norm or head
    permutation gives errors of order 1).
    """
    torch = pytest.importorskip("torch")
    model, _ = hf_smollm2
    for ids in smollm2_fp.encode(PROMPTS, chat=True):
        ours = smollm2_fp.logits([ids], precision="fp")[0]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        assert rel <= 1e-4, rel
        assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0


def test_greedy_generation_matches_transformers(smollm2_fp, hf_smollm2):
    """64+ greedy tokens, token-identical to transformers' generate (chat and plain prompts)."""
    torch = pytest.importorskip("torch")
    model, _ = hf_smollm2
    cases = [(PROMPTS[1], True), (PROMPTS[2], True),
             ("Once upon a time, in a small village by the sea, there lived", False)]
    for prompt, chat in cases:
        ids = smollm2_fp.encode([prompt], chat=chat)[0]
        ours = smollm2_fp.generate([ids], mode="fp", max_new_tokens=72).tokens[0]
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=72, do_sample=False, pad_token_id=smollm2_fp.config.pad_token_id,
            )[0, len(ids):].tolist()
        assert ours == ref, (prompt, smollm2_fp.decode(ours), smollm2_fp.decode(ref))
        assert len(ours) >= 64, f"only {len(ours)} tokens for {prompt!r}: pick a longer prompt"


def test_batch_of_mixed_lengths_equals_each_alone(smollm2_fp):
    ids = smollm2_fp.encode(PROMPTS, chat=True)
    assert len({len(i) for i in ids}) >= 3  # mixed lengths
    batched = smollm2_fp.generate(ids, mode="fp", max_new_tokens=32)
    for i, one in enumerate(ids):
        alone = smollm2_fp.generate([one], mode="fp", max_new_tokens=32)
        assert alone.tokens[0] == batched.tokens[i], i
        assert alone.finish_reasons[0] == batched.finish_reasons[i]
