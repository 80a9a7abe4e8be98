"""Reading and writing Megatron's `model_optim_rng.pt` without Megatron, and without running its pickle.

The file is a torch.save'd dict whose `args` is an argparse.Namespace holding values of classes
from Adept's Megatron fork (enums such as megatron.model.enums.ModelType) and from the
`tool_use.megatron.megatron_utils` stub that adept-inference ships only so the pickle can be read
(reference adept-inference.md §2.5). kaki reads it with torch.load(weights_only=True), which calls
nothing that is not allowlisted. The allowlist is:

- argparse.Namespace itself (a plain attribute bag);
- for any global in the `megatron` and `tool_use` packages, and for the numpy names Megatron's
  `rng_state` pickles, an inert stand-in class made for that name. A stand-in only records the
  arguments and state the pickle hands it and has no other behaviour, so whatever name a file
  puts there, nothing runs.

Every other global (os.system, builtins.eval, subprocess.Popen, ...) is refused, by name, before
unpickling starts. The stand-ins pickle back under their original names, so a release written
by kaki carries the same `args` Megatron wrote.
"""

from __future__ import annotations

import argparse
import copyreg
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

from kaki.errors import CheckpointError

# Globals allowed as themselves: harmless, and the objects are used as they are.
REAL_GLOBALS: dict[str, Any] = {"argparse.Namespace": argparse.Namespace}
# Top-level packages whose classes a Megatron/adept checkpoint pickles inside `args`: Adept's
# Megatron fork (megatron.model.enums.ModelType, AttnMaskType, ...) and its tool_use stub
# (tool_use.megatron.megatron_utils.ModelBackend).
STAND_IN_PACKAGES = ("megatron", "tool_use")
# What np.random.get_state() pickles as, in Megatron's `rng_state` (saved unless --no-save-rng).
# kaki never uses the RNG state, so these become records too; numpy need not be installed.
RNG_STATE_GLOBALS = frozenset({
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
})


class StandIn:
    """An inert record of an object of a class kaki does not have (an enum member, a config object).

    The pickle builds it either by calling the class (REDUCE: enums pickle as `Class(value)`) or
    with `Class.__new__(Class, *args)` plus a BUILD state (NEWOBJ: plain objects). Both are recorded
    so `__reduce__` can write the object back exactly as it was read.
    """

    _kaki_global: tuple[str, str] = ("", "")  # (module, name) this class stands in for

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj._kaki_args, obj._kaki_called, obj._kaki_state = args, False, None
        return obj

    def __init__(self, *args):
        self._kaki_called = True  # only reached through REDUCE (a call); NEWOBJ skips __init__

    def __setstate__(self, state):
        self._kaki_state = state

    @property
    def value(self):
        """An enum member's value (what `Class(value)` was called with)."""
        return self._kaki_args[0] if len(self._kaki_args) == 1 else self._kaki_args

    def __reduce__(self):
        cls = type(self)
        if self._kaki_called:
            return cls, self._kaki_args, self._kaki_state
        return copyreg.__newobj__, (cls, *self._kaki_args), self._kaki_state

    def __eq__(self, other):
        return (type(self) is type(other) and self._kaki_args == other._kaki_args
                and self._kaki_called == other._kaki_called and self._kaki_state == other._kaki_state)

    def __hash__(self):
        return hash((type(self), repr(self._kaki_args)))

    def __repr__(self):
        module, name = self._kaki_global
        args = ", ".join(repr(a) for a in self._kaki_args)
        return f"<{module}.{name}({args}) stand-in>"


_STAND_INS: dict[str, type] = {}


def stand_in(full_name: str) -> type:
    """The stand-in class for `module.Name` (one per name, so equal names compare equal)."""
    if full_name not in _STAND_INS:
        # At pickle protocol 2 (torch.save's) a GLOBAL always names a module attribute, so the
        # last dot separates module and name.
        module, _, name = full_name.rpartition(".")
        _STAND_INS[full_name] = type(name, (StandIn,), {"_kaki_global": (module, name),
                                                        "__qualname__": name})
    return _STAND_INS[full_name]


def plain(value: Any) -> Any:
    """An args value with stand-in enum members replaced by their values."""
    return value.value if isinstance(value, StandIn) else value


def _allowlist(path: Path) -> list[tuple[Any, str]]:
    """(object, name) pairs for every global the pickle in `path` needs beyond torch's defaults;
    a CheckpointError if it needs anything outside the allowlist. Nothing is unpickled here:
    torch disassembles the pickle statically."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError as e:  # not a zip archive: truncated, corrupted, or not torch.save output
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e}); the file is corrupted "
                              "or truncated: extract it again from the release tarball") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupted or is not a torch.save checkpoint ({e}); extract it "
                              "again from the release tarball") from None
    allowed, refused = [], []
    for full in sorted(unsafe):
        if full in REAL_GLOBALS:
            allowed.append((REAL_GLOBALS[full], full))
        elif full in RNG_STATE_GLOBALS or full.split(".")[0] in STAND_IN_PACKAGES:
            allowed.append((stand_in(full), full))
        else:
            refused.append(full)
    if refused:
        raise CheckpointError(
            f"refusing to load {path}: its pickle asks for {', '.join(refused)}, which a Megatron "
            "checkpoint never contains (it holds tensors, an argparse.Namespace and Megatron/adept "
            "enums). The file may be malicious or is not a Megatron checkpoint; kaki will not run it.")
    return allowed


def load_checkpoint_file(path: Path) -> Any:
    """torch.load(weights_only=True) with the allowlist; tensors stay mmapped on disk."""
    allowed = _allowlist(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: {e}. kaki only unpickles tensors, "
                              "argparse.Namespace and Megatron/adept classes") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is corrupted ({e}); extract it again from the release "
                              "tarball") from None


class _Pickler(pickle._Pickler):
    """pickle's Python Pickler, writing a stand-in class as the global it stands in for
    (`megatron.model.enums ModelType`), which the C pickler would try to import."""

    def save_global(self, obj, name=None):
        target = obj.__dict__.get("_kaki_global") if isinstance(obj, type) else None
        if target is None or not issubclass(obj, StandIn):
            return super().save_global(obj, name)
        module, qualname = target
        self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
        self.memoize(obj)


# What torch.save needs of a pickle module: a name and its Pickler.
_PICKLE_MODULE = types.ModuleType("kaki_megatron_pickle")
_PICKLE_MODULE.Pickler = _Pickler


def save_checkpoint_file(obj: Any, path: Path) -> None:
    torch.save(obj, path, pickle_module=_PICKLE_MODULE)
