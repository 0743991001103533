"""Start-up hook that activates mergekit-aim when mergekit is imported.

Loaded from ``mergekit_aim_autoload.pth`` at interpreter start. mergekit has no
plugin entry points and its ``MergeConfiguration`` ignores unknown keys, so an
``aim:`` block would be dropped silently unless the plugin is active before any
config is parsed. This module therefore only installs a meta-path finder; the
plugin itself is imported the moment one of mergekit's modules that it extends
has finished executing, before the importer sees the module.

Stdlib only, and cheap: it must not import torch, mergekit or pydantic.
Set ``MERGEKIT_AIM_DISABLE=1`` to turn the hook off.
"""

import os
import sys

# The mergekit modules the plugin extends, in the order mergekit imports them.
WATCHED = ("mergekit.config", "mergekit.card", "mergekit.plan")


class _PostImportFinder:
    """Meta-path finder wrapping the loader of watched modules.

    Duck-typed rather than an importlib.abc subclass: importing importlib.abc
    alone costs ~20 ms at start-up.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _NotifyingLoader(loader)
        return spec


class _NotifyingLoader:
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        # Restore the original loader so reloads and introspection see mergekit's.
        module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        from mergekit_aim import plugin

        plugin.on_module_executed(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def install() -> bool:
    """Install the finder once; return whether it is (now) installed."""
    if os.environ.get("MERGEKIT_AIM_DISABLE", "").strip() not in ("", "0"):
        return False
    if any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        return True
    sys.meta_path.insert(0, _PostImportFinder())
    already = [name for name in WATCHED if name in sys.modules]
    if already:
        # mergekit was imported before this hook (unusual start-up order):
        # extend what is there now; the finder covers the rest.
        from mergekit_aim import plugin

        for name in already:
            plugin.on_module_executed(sys.modules[name])
    return True
