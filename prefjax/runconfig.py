"""Reading a run's config by dotted path.

One reader for the pipeline, the experiments and the report, so none of them imports another's
private helper. ``config`` is a (locked) ml_collections ConfigDict or any nested mapping/object.
"""

from __future__ import annotations

from typing import Any, Mapping


def lookup(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b.c`` for ``dotted="a.b.c"``, or ``default`` where any part is absent."""
    node = config
    for part in dotted.split("."):
        if isinstance(node, Mapping):
            if part not in node:
                return default
            node = node[part]
        else:
            if not hasattr(node, part):
                return default
            node = getattr(node, part)
    return node
