"""Extensions from outside the package: dataset formats, runtimes, hooks.

A plugin is a Python module that registers what it adds when imported
(``efficientdet.data.formats.register_format``, ``efficientdet.runtimes.register_target``,
``efficientdet.ckpt.layouts.register_layout``). The
scripts import plugins before they build their options, so a registered format is a valid
``dataset_format`` and a registered runtime a ``--backend`` choice everywhere. Plugins are named by

- the environment variable ``EFFICIENTDET_PLUGINS`` (module names, comma-separated), or
- the entry-point group ``efficientdet.plugins`` of an installed package
  (``[project.entry-points."efficientdet.plugins"] name = "my_package.my_module"``).

From Python, importing the module (or calling its registration) is all it takes.
"""
from __future__ import annotations

import importlib
import os
from typing import List

from .errors import UserError

__all__ = ['ENV_VAR', 'ENTRY_POINT_GROUP', 'load_plugins']

ENV_VAR = 'EFFICIENTDET_PLUGINS'
ENTRY_POINT_GROUP = 'efficientdet.plugins'
_loaded: List[str] = []


def load_plugins() -> List[str]:
    """Import the plugin modules named by :data:`ENV_VAR` and the :data:`ENTRY_POINT_GROUP` entry
    points (each once per process); returns the modules imported so far. A module that fails to
    import is a UserError naming it and where it was named."""
    names = [(n.strip(), ENV_VAR) for n in os.environ.get(ENV_VAR, '').split(',') if n.strip()]
    from importlib.metadata import entry_points
    found = entry_points()
    group = (found.select(group=ENTRY_POINT_GROUP) if hasattr(found, 'select')  # Python 3.10+
             else found.get(ENTRY_POINT_GROUP, []))  # Python 3.9: a dict of groups
    names += [(ep.value, f'entry point {ep.name!r} ({ENTRY_POINT_GROUP})') for ep in group]
    for name, where in names:
        module = name.split(':')[0]
        if module in _loaded:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f'plugin {module!r} (named by {where}) cannot be imported: {e}') from None
        _loaded.append(module)
    return list(_loaded)
