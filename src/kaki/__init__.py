"""kaki: run, serve, chat with and fine-tune Persimmon-class decoder language models."""

from kaki.errors import CheckpointError, KakiError, ParamError
from kaki.llm import LLM, Completion, load
from kaki.sampling import SamplingParams

__all__ = ["load", "LLM", "Completion", "SamplingParams", "KakiError", "CheckpointError", "ParamError"]
__version__ = "0.1.0"
