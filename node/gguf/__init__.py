"""GGUF models: llama.cpp's single-file format, as Ollama stores it.

- ``catalog``: the built-in list of known models (``nodectl pull smollm2:135m``) and
  fetching one, verified, into a cache;
- ``ollama``: finding a model's GGUF blob in a local Ollama store;
- ``config`` / ``tokenizer``: the Hugging Face ``config.json`` and tokenizer files a
  GGUF's metadata describes, written next to it at import so the engine and the
  tokenizer read a GGUF model exactly like a Hugging Face one.

The header itself is parsed by ``protocol/gguf.py`` (pure, bounded); dequantizing
the tensors is the engine's (``node/engine/gguf.py``).
"""
