"""moeless: serverless experts for Mixture-of-Experts serving.

Importing moeless registers "moeless" in Hugging Face transformers' ExpertsInterface (transformers v5), so
`from_pretrained(..., experts_implementation="moeless")` runs moeless's kernels. transformers is heavy to
import, so registration is lazy: done now if transformers' MoE integration is already imported, otherwise the
moment it is (a one-shot import hook). Nothing here imports transformers itself.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_HF_MOE_MODULE = "transformers.integrations.moe"


def _register_hf() -> None:
    half_loaded = sys.modules.get("moeless.hf")
    if half_loaded is not None and not hasattr(half_loaded, "register"):
        return  # moeless.hf itself is importing transformers; it registers when it finishes loading
    try:
        from moeless import hf

        hf.register()
    except ImportError:  # transformers missing or without the ExpertsInterface: the extra is optional
        pass


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs the real loader of transformers' MoE integration, then registers moeless in it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_hf()


class _HfRegistrationHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _HF_MOE_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


if _HF_MOE_MODULE in sys.modules:
    _register_hf()
elif not any(isinstance(f, _HfRegistrationHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _HfRegistrationHook())
