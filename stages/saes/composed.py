"""SAE classes made from a mixin and an activation's SAE class (a TopK transcoder, a ReLU crosscoder, ...),
each made once, so a class rebuilt from a run's config is the class that trained it."""

from __future__ import annotations

_CLASSES: dict[tuple[type, type], type] = {}


def composed_class(mixin: type, base: type, arch: str, name: str) -> type:
    """The class `name` = mixin first (its methods come before the SAE's own), then `base`, the SAE whose
    sparsity rule it uses; `arch` is what its config records, `base.arch` its activation."""
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(name, (mixin, base), {"arch": arch, "activation": base.arch})
    return _CLASSES[key]
