"""The shared core: SVD maths, the steering-artifact file format, model and tokenizer identity.

Imported by every process (vLLM engines, the sidecar, offline tools). `steering` needs torch;
`artifact`, `identity` and `validation` do not (the sidecar runs without torch).
"""
