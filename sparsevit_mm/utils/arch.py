"""The arch lookup every model family shares: a name in the family's table, or a dict of settings."""
from typing import Mapping, Sequence, Union


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
