"""The shared core: SVD maths, the steering-artifact file format, model and tokenizer identity.

Imported by every process (vLLM engines, the sidecar, offline tools); depends on torch only.
"""
