"""Evaluation harness: math word problems, HumanEval pass@1 and held-out perplexity per mode."""
