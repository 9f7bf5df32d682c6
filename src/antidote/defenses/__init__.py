"""The defenses the pipeline can run, one module each, registered by name (`REGISTRY`, `get`).

To add a method here: write `antidote/defenses/<name>.py` that builds a `Defense` (name, stage, config
dataclass, run) and calls `register`, add its import line below, and add `tests/test_defense_<name>.py`.
Nothing else needs editing: the pipeline places it by its stage, and `antidote defend NAME` and the run
config section `defenses: {NAME: {...}}` take their options from its config dataclass.

From a package of your own, without editing antidote: point an `antidote.defenses` entry point at your
`Defense` (docs/adding-a-defense.md); `load_plugins` registers it when this package is imported.
"""

# One line per method (importing a module registers it).
from antidote.defenses import antidote as _antidote  # noqa: F401
from antidote.defenses import booster as _booster  # noqa: F401
from antidote.defenses import harm_filter as _harm_filter  # noqa: F401
from antidote.defenses import harm_revert as _harm_revert  # noqa: F401
from antidote.defenses import ldifs as _ldifs  # noqa: F401
from antidote.defenses import lisa as _lisa  # noqa: F401
from antidote.defenses import lox as _lox  # noqa: F401
from antidote.defenses import magnitude_prune as _magnitude_prune  # noqa: F401
from antidote.defenses import oneshot_ft as _oneshot_ft  # noqa: F401
from antidote.defenses import random_prune as _random_prune  # noqa: F401
from antidote.defenses import repnoise as _repnoise  # noqa: F401
from antidote.defenses import resta as _resta  # noqa: F401
from antidote.defenses import rollback as _rollback  # noqa: F401
from antidote.defenses import safedelta as _safedelta  # noqa: F401
from antidote.defenses import safelora as _safelora  # noqa: F401
from antidote.defenses import vaccine as _vaccine  # noqa: F401
from antidote.defenses import wei_set_difference as _wei_set_difference  # noqa: F401
from antidote.defenses.base import (
    REGISTRY,
    RESERVED,
    STAGES,
    Defense,
    entry,
    entry_options,
    get,
    register,
)


def load_plugins() -> list[str]:
    """Register the defenses of the `antidote.defenses` entry points of installed packages; returns their
    names. One that is not a `Defense`, or takes a name already registered, is left out (with a warning)."""
    from antidote.plugins import BROKEN, DEFENSE_GROUP, load_entry_points, log

    added = []
    for name, defense in load_entry_points(DEFENSE_GROUP).items():
        if not isinstance(defense, Defense) or defense.name != name or name in REGISTRY:
            why = (
                f"not an antidote.defenses.Defense named {name!r}"
                if not isinstance(defense, Defense) or defense.name != name
                else "the name of a defense already registered"
            )
            BROKEN[f"{DEFENSE_GROUP}:{name}"] = why
            log.warning("entry point %s in %s left out: %s", name, DEFENSE_GROUP, why)
            continue
        register(defense)
        added.append(name)
    return added


load_plugins()

__all__ = [
    "REGISTRY",
    "RESERVED",
    "STAGES",
    "Defense",
    "entry",
    "entry_options",
    "get",
    "load_plugins",
    "register",
]
