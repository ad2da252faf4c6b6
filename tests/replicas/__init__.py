"""Tiny replicas of the real model families, built offline in the tests.

Random weights in each family's real layout, parameter names and config fields, with the family's real
tokenizer files where a package ships them (npm: Llama-2, Qwen2/3) or one trained in the test
(SentencePiece for ChatGLM3, a tiktoken ranks file for Qwen-1). Each module's `build(out, seed)` writes a
model dir as the hub would deliver it and returns its path.
"""
