"""Loading checkpoints without running code from them.

A ``.pt`` file is a pickle, and unpickling calls whatever the file names: ``torch.load(weights_only=False)`` on a
checkpoint from a forum can run a shell command. :func:`load` never does that unless told to trust the file:

1. It lists every global the pickle references (``torch.serialization.get_unsafe_globals_in_checkpoint``, a static
   scan: nothing is unpickled) and refuses, with one line naming the file and the objects, any that the caller's
   allow-list (``allow``, see :class:`Allowed`) and torch's own safe set (tensors, dicts, dtypes) do not admit.
2. It then unpickles with ``torch.load(weights_only=True)``: torch's restricted unpickler, which admits exactly
   those objects, and here only in the roles :class:`Allowed` gives them.

Classes are admitted to be *rebuilt*, not *called*. Every pickled ``nn.Module`` is rebuilt the way pickle rebuilds
plain objects: allocated without ``__init__`` (opcode NEWOBJ) and filled with its saved attributes (BUILD). A
crafted file can instead ask for a call (REDUCE), which runs ``__init__`` with arguments of its choosing, and an
Ultralytics model's ``__init__`` evaluates a config string (``DetectionModel({"activation": "..."})``). So the name of
a rebuild-only class resolves to :class:`_RebuildOnly`, which allocates an instance but raises when called, and the
real class is registered under a name no pickle can spell (it holds a newline: pickle's GLOBAL reads names line by
line), because torch's BUILD checks that the instance's type is admitted. This relies on torch's weights-only
unpickler as of torch 2.6-2.14 (``torch/_weights_only_unpickler.py``): NEWOBJ calls ``cls.__new__(cls, *args)`` on
what GLOBAL pushed, REDUCE calls it, BUILD checks ``type(instance)`` among the admitted values. Should a release
change that, checkpoints fail to load (loudly), they do not load unsafely.

Trusting a file (``--trust-checkpoint`` on the command line, ``trust_checkpoints: true`` in a recipe,
:func:`trust_checkpoints` in Python, or ``DETKD_TRUST_CHECKPOINTS=1`` in the environment, which the others set for
the run and its child processes) loads what the allow-list refuses with ``weights_only=False``, after a one-line
warning naming the file and what it references. A file the allow-list admits is loaded restricted either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import pickletools
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from detkd.errors import DetkdError

# torch is imported where a file is loaded: the command line imports this module for its option.

TRUST_ENV = "DETKD_TRUST_CHECKPOINTS"
_TRUST_HINT = "pass --trust-checkpoint, or set trust_checkpoints: true in the recipe, to load it anyway"
TRUST_HELP = "load checkpoints that hold more than Ultralytics checkpoints do (unpickling them can run code)"
_SHOWN = 3  # foreign objects named in a refusal
_log = logging.getLogger("detkd")
_lock = threading.Lock()  # torch's allow-list is one set for the whole process


@dataclass(frozen=True)
class Allowed:
    """What a global name in a checkpoint may resolve to, and in which role."""

    obj: Any  # the class or function the name stands for
    callable: bool = False  # False: a class whose instances are rebuilt (NEWOBJ + BUILD), never called (REDUCE)
    builds: tuple[type, ...] = ()  # types of what calling ``obj`` returns, when pickle then fills them (BUILD)


AllowList = Callable[[str], "Allowed | None"]


class _Refused(Exception):
    """Why a file may not be loaded restricted; :func:`load` turns it into one line (or trusts the file)."""


class _RebuildOnly:
    """What a rebuild-only class's name resolves to: NEWOBJ allocates an instance of the class, REDUCE refuses.

    The unpickler calls ``pushed.__new__(pushed, *args)`` for NEWOBJ; an instance attribute ``__new__`` answers it.
    """

    def __init__(self, cls: type, name: str):
        self.name = name
        self.__new__ = lambda _self, *args: cls.__new__(cls, *args)

    def __call__(self, *args, **kwargs):
        raise _Refused(f"it calls {self.name} with arguments of its own, where checkpoints only rebuild it")


def trusted() -> bool:
    """Whether checkpoints the allow-list refuses are loaded anyway (``DETKD_TRUST_CHECKPOINTS``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def trust_checkpoints(enabled: bool = True) -> Iterator[None]:
    """Trust checkpoints for the duration (and in child processes started within); ``False`` changes nothing."""
    if not enabled or trusted():
        yield
        return
    os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(TRUST_ENV, None)


def load(
    path: str | os.PathLike, allow: AllowList, map_location=None, kind: str = "Ultralytics checkpoint", **kwargs
) -> Any:
    """``torch.load(path)`` restricted to ``allow`` and torch's safe types; refused (one line) or trusted otherwise.

    ``allow(name)`` answers for each global the file references (``"ultralytics.nn.tasks.DetectionModel"``), see
    :class:`Allowed`. ``kind`` names what the file should be, in a refusal. ``kwargs`` go to ``torch.load``. A
    damaged file raises what ``torch.load`` raises.
    """
    import torch

    try:
        return _load_restricted(path, allow, map_location, kind, **kwargs)
    except _Refused as why:
        if not trusted():
            raise DetkdError(f"{path}: refused to load: {why} ({_TRUST_HINT})") from None
        _log.warning(f"detkd: warning: {path}: {why}; loading it anyway, with full unpickling (trusted)")
        return torch.load(path, map_location=map_location, weights_only=False, **kwargs)


def pickled_strings(path: str | os.PathLike) -> Iterator[str]:
    """Every string in the pickle of a ``torch.save`` archive (class names, dict keys), read statically with
    :mod:`pickletools`: nothing in the file runs. Empty for a file that is not such an archive, so a family can
    recognise its checkpoints by a name they hold before any loader opens them."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickle_name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))  # torch.save's layout
            ops = list(pickletools.genops(archive.read(pickle_name)))
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):  # not a zip, no pickle, a malformed pickle
        return iter(())
    return (arg for _, arg, _ in ops if isinstance(arg, str))


def _load_restricted(path, allow: AllowList, map_location, kind: str, **kwargs) -> Any:
    import torch

    with _lock, _only_these_globals() as admit:
        try:  # with no other globals admitted, the scan lists every one outside torch's own safe set
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except ValueError:  # not a zip archive (a plain or legacy pickle), or TorchScript: nothing to check first
            article = "an" if kind[0].lower() in "aeiou" else "a"
            raise _Refused(f"not {article} {kind}: not the zip archive torch.save writes, nothing to check") from None
        except pickle.UnpicklingError as e:  # an opcode the scan (and torch's unpickler) does not read
            raise _Refused(f"torch's weights-only unpickler rejects it ({_unpickler_reason(e)})") from None
        allowed = {name: allow(name) for name in names}
        if foreign := [name for name, entry in allowed.items() if entry is None]:
            more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
            shown = ", ".join(foreign[:_SHOWN]) + more
            raise _Refused(f"it references {shown}, which no {kind} holds")
        admit([registration for name, entry in allowed.items() for registration in _registrations(name, entry)])
        try:
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:  # what the static scan cannot see
            raise _Refused(f"torch's weights-only unpickler rejects it ({_unpickler_reason(e)})") from None


def _registrations(name: str, entry: Allowed) -> list[tuple[Any, str]]:
    """``(object, name)`` pairs for torch's allow-list. Names holding a newline are unreachable from a pickle: they
    admit instances of a type to BUILD without letting the file reach the type itself."""
    if entry.callable:
        pairs = [(entry.obj, name)]
    else:
        pairs = [(_RebuildOnly(entry.obj, name), name), (entry.obj, f"{name}\n(rebuilt)")]
    return pairs + [(t, f"{name}\n(builds {t.__module__}.{t.__qualname__})") for t in entry.builds]


@contextlib.contextmanager
def _only_these_globals() -> Iterator[Callable[[list], None]]:
    """Torch's process-wide allow-list holding nothing but what the caller admits, restored after.

    Anything registered before (by the user, or by Ultralytics' own opt-in restricted loading, which registers real
    model classes under their names) would otherwise widen what a file may reference and call.
    """
    import torch

    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        yield torch.serialization.add_safe_globals
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _unpickler_reason(error: Exception) -> str:
    """The unpickler's own words from torch's multi-line message: its last line before the link to the docs."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith("Check the documentation")]
    return reasons[-1] if reasons else type(error).__name__
