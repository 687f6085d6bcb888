"""The plug-in contract: the user's model factory and data function (and loss, see components/loss.py), resolved from import strings.

An import string is `path/to/file.py:Name` (a file, loaded by path, its folder put on sys.path so the
seed's sibling imports work) or `package.module:Name`. Every failure is a `UserError` that names the
string and what is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .errors import UserError


def resolve(spec: str, key: str) -> Callable:
    """Return the object an import string names; `key` is the config key it came from, for messages."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise UserError(f"{key}: {spec!r} is not an import string; write `path/to/file.py:Name` or `package.module:Name`.")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"{key}: file {module_part!r} in {spec!r} does not exist (relative paths start at {Path.cwd()}).")
        _import_siblings_from(path.parent)
        name = f"_dist_train_user_{path.stem}_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except Exception:
                del sys.modules[name]
                raise
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            # Only the named module itself (or a parent package) missing is the user's typo; a module it
            # imports that is missing is reported as it is.
            if exc.name and (module_part == exc.name or module_part.startswith(exc.name + ".")):
                raise UserError(f"{key}: module {module_part!r} in {spec!r} cannot be found; check the name or install it.") from None
            raise
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UserError(f"{key}: {module_part!r} has no attribute {attr!r} (it has: {', '.join(public[:12])}).") from None


_USER_FOLDERS: set[Path] = set()  # the folders of user files loaded in this process


def _import_siblings_from(folder: Path) -> None:
    """Make `folder`'s files win the user's sibling imports (`from dataset import MyDataset`), as in a fresh
    process: its folder goes first on sys.path, and a module of the same name cached from another user
    folder (an earlier in-process run of another project) is dropped, not silently reused. Modules from
    anywhere else (the standard library, installed packages) are left alone."""
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    sys.path.insert(0, str(folder))
    _USER_FOLDERS.add(folder)
    for name, module in list(sys.modules.items()):
        origin = getattr(module, "__file__", None)
        if "." in name or not origin or not (folder / f"{name}.py").is_file():
            continue
        cached_from = Path(origin).resolve().parent
        if cached_from != folder and cached_from in _USER_FOLDERS:
            del sys.modules[name]


def check_call(fn: Callable, kwargs: dict, what: str, fix: str, *args) -> None:
    """A UserError if `fn(*args, **kwargs)` would fail on its signature alone (before running any of it)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: let the call itself tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise UserError(f"{what}: {exc}. {fix}") from None


def build_model(spec: str, kwargs: dict) -> nn.Module:
    factory = resolve(spec, "model")
    check_call(factory, kwargs, f"model: {spec!r} cannot take model_args {kwargs!r}", "Fix model_args.")
    model = factory(**kwargs)  # an error inside the user's code is theirs, shown as it is
    if not isinstance(model, nn.Module):
        raise UserError(f"model: {spec!r} returned a {type(model).__name__}, not a torch.nn.Module; it must return the model.")
    return model
