"""kaki: run, serve, chat with and fine-tune Persimmon-class decoder language models."""

from kaki.errors import CheckpointError, KakiError, ParamError

__all__ = ["load", "LLM", "Completion", "SamplingParams", "KakiError", "CheckpointError", "ParamError"]
__version__ = "0.1.0"

# The model API imports torch (about a second); it is loaded on first use, so commands that never
# touch a model (`kaki index query` on a BM25 index, `kaki --help`) start at once.
_LAZY = {"load": "kaki.llm", "LLM": "kaki.llm", "Completion": "kaki.llm", "SamplingParams": "kaki.sampling"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kaki' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
