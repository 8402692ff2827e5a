"""Offline research tools: assets, tasks, warm start, extraction and calibration, evaluation.

Run by the CLI and the benchmarks in their own process (transformers + peft); never inside vLLM.
"""
