"""Reading checkpoint files safely on torch >= 2.6 (``weights_only=True`` by default)."""
import argparse
import collections
import re
from typing import Dict, Sequence

import torch
import torch.nn as nn


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it is loaded into (the message names the keys)."""


def safe_checkpoint_globals() -> list:
    """Types found in mmengine / official research checkpoints that are safe to unpickle.

    Allow-listed one by one for ``torch.load(weights_only=True)`` instead of turning the safe loader off:
    mmengine's resume state (``HistoryBuffer`` with numpy arrays and scalars, and its statistics methods, which
    pickle as ``getattr(HistoryBuffer, 'mean')``) and ``argparse.Namespace`` (the ``args`` entry of the official
    DynamicViT / DVT checkpoints). ``getattr`` only looks attributes up: the safe loader still refuses to call
    anything that is not on its allow-list.
    """
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    types = [HistoryBuffer, getattr, argparse.Namespace, collections.OrderedDict, np.ndarray, np.dtype,
             multiarray._reconstruct, multiarray.scalar]
    types += [type(np.dtype(name)) for name in ('float64', 'float32', 'float16', 'int64', 'int32', 'bool', 'uint8')]
    return types


def allow_mmengine_checkpoints():
    """Register :func:`safe_checkpoint_globals` with torch's safe loader (mmengine's resume needs it)."""
    torch.serialization.add_safe_globals(safe_checkpoint_globals())


def load_checkpoint_file(path: str, map_location='cpu'):
    """``torch.load`` with the safe loader and the allow-list above."""
    # Only add what is not registered yet: leaving the context removes its globals, even ones that
    # allow_mmengine_checkpoints() had registered for the whole process.
    registered = set(torch.serialization.get_safe_globals())
    missing = [g for g in safe_checkpoint_globals() if g not in registered]
    with torch.serialization.safe_globals(missing):
        return torch.load(path, map_location=map_location, weights_only=True)


def unwrap_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: mmengine's ``state_dict``, the official ``model``, or the dict itself."""
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model', 'model_state_dict', 'module'):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                return dict(checkpoint[key])
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return dict(checkpoint)
    raise CheckpointMismatchError(
        'could not find model weights in the checkpoint: expected a state dict, or a dict with one under '
        f"'state_dict' / 'model' / 'model_state_dict'; top-level keys: {list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__}")


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The (unwrapped) model weights of a checkpoint file; ``module.`` prefixes from DDP are removed."""
    state_dict = unwrap_state_dict(load_checkpoint_file(path))
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_checked(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = 'state_dict',
                            optional_groups: Sequence[str] = ()) -> list:
    """``load_state_dict`` that refuses weights that do not fit, naming the missing / unexpected / mis-shaped keys.

    ``optional_groups`` are regular expressions; a group of parameters matching one may be absent from the
    checkpoint as a whole (e.g. score predictors when initialising from a dense checkpoint): those keep their
    current values. A group that is partly present must be complete. Returns the absent groups.
    """
    own = module.state_dict()
    absent = [g for g in optional_groups if not any(re.search(g, k) for k in state_dict)]
    missing = [k for k in own if k not in state_dict and not any(re.search(g, k) for g in absent)]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f'{source} does not fit {type(module).__name__}']
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mis_shaped)):
            if keys:
                shown = ', '.join(keys[:20]) + (f', ... ({len(keys)} in all)' if len(keys) > 20 else '')
                parts.append(f'{title}: {shown}')
        raise CheckpointMismatchError('; '.join(parts))
    module.load_state_dict(state_dict, strict=False)
    return [g for g in absent if any(re.search(g, k) for k in own)]
