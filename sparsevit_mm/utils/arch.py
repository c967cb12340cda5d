"""The arch lookup every model family shares: a name in the family's table, or a dict of settings."""
import numbers
from typing import Mapping, Sequence, Union


def check_int(value, name: str, low: int, high: int, meaning: str = '') -> int:
    """``value`` if it is an integer in [low, high], else a ValueError naming it, the range and ``meaning``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f'{name} must be an integer from {low} to {high}, got {value!r}'
                         + (f' ({meaning})' if meaning else ''))
    return int(value)


def resolve_arch(owner: str, arch: Union[str, Mapping], zoo: Mapping[str, Mapping], required: Sequence[str],
                 optional: Sequence[str] = ()) -> dict:
    """A copy of the settings ``arch`` names in ``zoo`` (case-insensitive), or of the custom ``arch`` dict.

    A name outside ``zoo``, a dict lacking a ``required`` key and a dict with a key outside ``required`` +
    ``optional`` (which would be ignored) are refused, naming what is allowed; ``owner`` is the model's name.
    """
    if isinstance(arch, str):
        key = arch.lower()
        if key not in zoo:
            raise ValueError(f'unknown arch {arch!r} for {owner}; choose one of {sorted(zoo)} or give a dict with the '
                             f'keys {list(required)}')
        return dict(zoo[key])
    if not isinstance(arch, Mapping):
        raise TypeError(f'{owner} arch must be a name or a dict, got {type(arch).__name__}: {arch!r}')
    missing = [k for k in required if k not in arch]
    if missing:
        raise ValueError(f'custom {owner} arch {dict(arch)} lacks the keys {missing} (required: {list(required)})')
    unknown = sorted(set(arch) - set(required) - set(optional))
    if unknown:
        raise ValueError(f'custom {owner} arch {dict(arch)} has unknown keys {unknown}; allowed: '
                         f'{[*required, *optional]}')
    return dict(arch)
