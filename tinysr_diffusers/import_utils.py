"""Lazy package namespaces in the style of diffusers' `_import_structure`, without importing torch.

diffusers' own `diffusers.utils._LazyModule` cannot be used: importing `diffusers.utils` imports torch (seconds), which
is what the lazy namespaces avoid. A lazy package's `__init__` names its exports for type checkers under
`if TYPE_CHECKING:`, then ends with

    _import_structure = {"submodule": ["Name"]}
    install_lazy_module(__name__, _import_structure)
"""

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Optional


class _LazyModule(ModuleType):
    """A package whose public names are imported from their submodules on first access.

    `import_structure` maps a submodule (relative name) to the names it defines. `__all__` and `dir()` list every
    name, so `from package import *` (used by the shims of saved pipeline folders) imports them all.
    """

    def __init__(
        self,
        name: str,
        module_file: str,
        import_structure: dict[str, list[str]],
        module_spec: Optional[Any] = None,
        extra_objects: Optional[dict[str, Any]] = None,
        doc: Optional[str] = None,
    ):
        super().__init__(name, doc)
        self._modules = set(import_structure)
        self._name_to_module = {value: key for key, values in import_structure.items() for value in values}
        self.__all__ = sorted(self._name_to_module)
        self.__file__ = module_file
        self.__spec__ = module_spec
        self.__path__ = [os.path.dirname(module_file)]
        self._objects = dict(extra_objects or {})

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | self._modules | set(self.__all__) | set(self._objects))

    def __getattr__(self, name: str) -> Any:
        if name in self._objects:
            value = self._objects[name]
        elif name in self._modules:
            value = importlib.import_module(f".{name}", self.__name__)
        elif name in self._name_to_module:
            value = getattr(importlib.import_module(f".{self._name_to_module[name]}", self.__name__), name)
        elif f"{self.__name__}.{name}" in sys.modules:  # a submodule imported before this namespace was installed
            value = sys.modules[f"{self.__name__}.{name}"]
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        setattr(self, name, value)  # cached: later lookups skip __getattr__
        return value


def install_lazy_module(
    name: str, import_structure: dict[str, list[str]], extra_objects: Optional[dict[str, Any]] = None
) -> None:
    """Replace the package `name`, whose `__init__` is running, by its lazy namespace (same file, spec and docstring):
    Python's import then returns the namespace."""
    package = sys.modules[name]
    sys.modules[name] = _LazyModule(
        name,
        package.__file__,
        import_structure,
        module_spec=package.__spec__,
        extra_objects=extra_objects,
        doc=package.__doc__,
    )
