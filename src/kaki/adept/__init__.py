"""Adept's original Persimmon-8B release (a Megatron checkpoint): load it, convert it both ways,
and trim the embedding rows its tokenizer can never produce.

`kaki.load(dir)` comes here when `is_release_dir(dir)`; `kaki convert` uses `kaki.adept.convert`.
"""

from kaki.adept.release import is_release_dir, load_release, read_release

__all__ = ["is_release_dir", "load_release", "read_release"]
