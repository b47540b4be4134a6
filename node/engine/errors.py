"""The engine's error types: everything a user can get wrong, from config.json to a request.

One module, imported by every stage (config, weights, model, sampling) and importing
nothing itself, so callers can catch ``EngineError`` without loading JAX. The tokenizer's
``TokenizerError`` lives with the tokenizer: that module is the text side, used without
the rest of the engine.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on bad input."""


class ModelConfigError(EngineError):
    """config.json is missing, malformed, or lacks a key the engine needs.

    Not ``ConfigError``: that name is the node config's (node.config).
    """


class UnsupportedModelError(ModelConfigError):
    """The architecture or one of its features is not implemented by this engine."""


class WeightsError(EngineError):
    """A safetensors file is malformed or does not match the config."""


class MissingTensorError(WeightsError):
    """A tensor the partition needs is in no safetensors file."""


class ShapeMismatchError(WeightsError):
    """A tensor's shape disagrees with what the config implies."""


class ContextOverflowError(EngineError):
    """A prompt or generation would run past the session's context length."""


class PartitionError(EngineError):
    """A partition's layer range or flags are invalid, or it was fed the wrong input."""


class SamplingError(EngineError):
    """Sampling parameters are out of range."""


class TokenRangeError(PartitionError):
    """A token id is outside the model's vocabulary."""
