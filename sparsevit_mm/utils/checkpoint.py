"""Reading checkpoint files safely, and the one way weights get into a model: convert the layout, check the fit.

Every route that loads weights (``init_cfg=dict(type='Pretrained')``, ``load_from`` / ``tools/test.py``, resume,
the distillation teacher, ``apis.init_model``, the converter CLI) goes through :func:`convert_for_model` and
:func:`check_fit`, or through :class:`CheckpointLayoutMixin`, which our modules use to convert and check whatever is
loaded into them (also by mmengine's or torch's own loaders).
"""
import argparse
import collections
import os
import pickle
import re
import urllib.parse
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]
# Keys a checkpoint may always lack: BatchNorm's counters (old checkpoints have none; torch fills them in).
ALWAYS_OPTIONAL = (r'(^|\.)num_batches_tracked$', )


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
    types += [type(np.dtype(name)) for name in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint32', 'bool',
                                                'uint8')]
    return types


def allow_mmengine_checkpoints():
    """Register :func:`safe_checkpoint_globals` with torch's safe loader (mmengine's resume needs it)."""
    torch.serialization.add_safe_globals(safe_checkpoint_globals())


def download(url: str) -> str:
    """The local copy of a checkpoint URL: torch hub's cache (as ``torch.hub.load_state_dict_from_url`` keeps it),
    downloaded once. A URL that cannot be fetched is a clear error that says to download it."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint'
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', name)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as error:  # noqa: BLE001  (whatever the network says, the advice is the same)
            raise FileNotFoundError(f'checkpoint {url} could not be downloaded ({type(error).__name__}: {error}); '
                                    'download the file and give its local path instead') from None
    return cached


def _is_safetensors(path: str, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    return path.endswith('.safetensors') or (len(head) > 8 and head[8:9] == b'{' and
                                             0 < int.from_bytes(head[:8], 'little') < os.path.getsize(path))


def load_checkpoint_file(path: str, map_location='cpu'):
    """Read a checkpoint file: the one function every route uses (ours, and mmengine's ``load_from``, resume,
    ``init_cfg`` and the frameworks' inferencers, for which it is registered as mmengine's loader of local paths and
    URLs).

    Reads what torch can read safely: ``torch.save`` files through ``torch.load(weights_only=True)`` with the
    allow-list above, and safetensors files (a flat state dict). ``http(s)://`` URLs are downloaded once into torch
    hub's cache. A missing file, one that is no checkpoint, a truncated one or a URL that cannot be fetched is a
    clear error naming the file.
    """
    if isinstance(path, str) and path.startswith(('http://', 'https://')):
        path = download(path)
    # Only add what is not registered yet: leaving the context removes its globals, even ones that
    # allow_mmengine_checkpoints() had registered for the whole process.
    registered = set(torch.serialization.get_safe_globals())
    missing = [g for g in safe_checkpoint_globals() if g not in registered]
    if isinstance(path, (str, os.PathLike)):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'checkpoint {path} does not exist')
        with open(path, 'rb') as f:
            head = f.read(9)
        if _is_safetensors(path, head):
            return _load_safetensors(path, map_location)
        # torch.save writes a zip archive (PK), older torch a pickle (protocol >= 2 starts with 0x80)
        if head[:2] != b'PK' and head[:1] != b'\x80':
            raise CheckpointMismatchError(f'{path} is not a checkpoint: torch.save writes a zip archive (or, before '
                                          f'torch 1.6, a pickle) and safetensors a JSON header; this file starts '
                                          f'with {head[:8]!r}')
    try:
        with torch.serialization.safe_globals(missing):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, IndexError, KeyError, ValueError, UnicodeDecodeError,
            AttributeError) as error:
        if 'Unsupported global' in str(error):
            raise CheckpointMismatchError(f'{path}: torch\'s safe loader refused it: {error}') from error
        raise CheckpointMismatchError(
            f'{path} is not a checkpoint torch can read (expected a file written by torch.save, e.g. a .pth); '
            f'reading it failed with {type(error).__name__}: {error}') from error


def _load_safetensors(path: str, map_location) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    device = map_location if isinstance(map_location, str) else 'cpu'
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointMismatchError(f'{path} is not a safetensors file torch can read: {error}') from error


def _read_for_mmengine(filename, map_location=None):
    return load_checkpoint_file(filename, 'cpu' if map_location is None else map_location)


def register_with_mmengine():
    """Make :func:`load_checkpoint_file` mmengine's loader of local files and http(s) URLs (its public
    ``CheckpointLoader.register_scheme``), so that ``load_from``, resume, ``init_cfg`` and the inferencers read files as
    every other route does. Done when this module is imported, i.e. before any model of ours is built."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes=['', 'http://', 'https://'], loader=_read_for_mmengine, force=True)


def unwrap_state_dict(checkpoint) -> StateDict:
    """The model weights inside a checkpoint: mmengine's ``state_dict``, the official ``model``, or the dict itself.

    DDP's ``module.`` prefix is removed.
    """
    state_dict = None
    if isinstance(checkpoint, dict):
        for key in ('state_dict', 'model', 'model_state_dict', 'module'):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = dict(checkpoint[key])
                break
        else:
            if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
                state_dict = dict(checkpoint)
    if state_dict is None:
        found = list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointMismatchError(
            'could not find model weights in the checkpoint: expected a state dict, or a dict with one under '
            f"'state_dict' / 'model' / 'model_state_dict' / 'module'; found {found}")
    if state_dict and all(k.startswith('module.') for k in state_dict):
        state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict_file(path: str) -> StateDict:
    """The (unwrapped) model weights of a checkpoint file."""
    return unwrap_state_dict(load_checkpoint_file(path))


def select_prefix(state_dict: StateDict, prefix: Optional[str], source: str = 'the checkpoint') -> StateDict:
    """The keys under ``prefix`` with the prefix removed (``prefix`` None or '' keeps everything)."""
    if not prefix:
        return dict(state_dict)
    prefix = prefix if prefix.endswith('.') else prefix + '.'
    selected = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not selected:
        raise CheckpointMismatchError(f'no key of {source} starts with the prefix {prefix!r}; its keys start with '
                                      f'{sorted({k.split(".")[0] for k in state_dict})}')
    return selected


# --------------------------------------------------------------------------------------------- layouts and fit
class CheckpointLayoutMixin:
    """For our ``BaseModule`` classes: whatever is loaded into them is converted to their layout and must fit, and
    they all initialise by one rule (:meth:`init_weights`).

    Subclasses define ``convert_checkpoint(state_dict, checkpoint=None)`` (their own keys, no prefix, from any
    layout they support; ``checkpoint`` is the whole file's dict when the caller has it) and
    ``optional_checkpoint_groups`` (regular expressions, relative to the module, of parameter groups a checkpoint
    may lack as a whole, e.g. score predictors that a dense checkpoint never had). ``resizable_checkpoint_keys``
    names buffers that take the checkpoint's shape.

    Each instance registers :func:`adopt_and_check_layout` with torch's public
    ``register_load_state_dict_pre_hook``, so it runs for every loader (torch's ``load_state_dict``, mmengine's
    ``load_checkpoint``, ``init_cfg``, EMA copies, resume, the frameworks' inferencers): keys of another layout are
    converted in place (keys already in this module's layout are left alone), missing, unexpected or mis-shaped keys
    raise :class:`CheckpointMismatchError` naming them, and the groups a checkpoint may lack keep their values.
    """
    optional_checkpoint_groups: Tuple[str, ...] = ()
    resizable_checkpoint_keys: Tuple[str, ...] = ()
    # Model keys (regular expressions) that a ``Pretrained`` init_cfg may lack as a whole besides the optional groups
    # (a classifier initialised from a backbone-only checkpoint keeps its head's initialisation).
    pretrained_may_lack: Tuple[str, ...] = ()
    # mmengine initialisers of the family's initialisation from scratch (or override ``default_init``)
    default_init_cfg: Tuple[dict, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(adopt_and_check_layout)

    def default_init(self):
        """This module's own initialisation from scratch; its children's ``init_weights`` run after it."""
        if self.default_init_cfg:
            from mmengine.model import initialize
            initialize(self, [dict(cfg) for cfg in self.default_init_cfg])

    def init_weights(self):
        """The one initialisation rule of our models: mmengine's order, with the checkpoint read our way.

        1. ``default_init()``: the family's initialisation from scratch (whatever a checkpoint lacks keeps it);
        2. the initialisers ``init_cfg`` names besides ``Pretrained`` (mmengine's ``initialize``);
        3. each child's own ``init_weights`` (heads, necks, nested models), as mmengine's ``BaseModule`` does;
        4. a ``Pretrained`` entry through :func:`load_weights`: read by :func:`load_checkpoint_file`, converted from
           its layout and loaded strictly, except for the optional groups and ``pretrained_may_lack``; a misfit
           raises :class:`CheckpointMismatchError` naming the file and the keys.
        """
        from mmengine.model import initialize
        from mmengine.model.weight_init import PretrainedInit
        cfgs = [] if self.init_cfg is None else \
            list(self.init_cfg) if isinstance(self.init_cfg, (list, tuple)) else [self.init_cfg]
        pretrained = [cfg for cfg in cfgs if cfg.get('type') in ('Pretrained', PretrainedInit)]
        self.default_init()
        if len(pretrained) < len(cfgs):
            initialize(self, [cfg for cfg in cfgs if cfg not in pretrained])
        for child in self.children():
            if hasattr(child, 'init_weights') and not getattr(child, 'is_init', False):
                child.init_weights()
        for cfg in pretrained:
            load_weights(self, cfg['checkpoint'], cfg.get('prefix'), allow_absent=self.pretrained_may_lack)
        self._is_init = True

    def convert_checkpoint(self, state_dict: StateDict, checkpoint: Optional[dict] = None) -> StateDict:
        return dict(state_dict)

    def adopt_checkpoint_layout(self, state_dict: dict, prefix: str) -> StateDict:
        """Convert the keys under ``prefix`` of ``state_dict`` to this module's layout, in place (nothing happens
        when they are in it already); returns them without the prefix."""
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not own or own.keys() == self.state_dict(keep_vars=True).keys():
            return own
        converted = self.convert_checkpoint(own)
        if converted.keys() != own.keys() or any(converted[k] is not v for k, v in own.items()):
            for key in own:
                del state_dict[prefix + key]
            state_dict.update({prefix + k: v for k, v in converted.items()})
        return converted


def adopt_and_check_layout(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """torch's load pre-hook of our modules (see :class:`CheckpointLayoutMixin`): convert the keys under ``prefix``
    to ``module``'s layout, check that they fit, and fill the groups the checkpoint may lack with the module's
    current values, so that the modules of ours nested in it and the loader see a complete state dict. Resizable
    buffers take the checkpoint's shape. An empty subtree is left to the caller's own strictness (e.g. a head-only
    load)."""
    converted = module.adopt_checkpoint_layout(state_dict, prefix)
    if not converted:
        return
    check_fit(module, converted, f'the checkpoint (at {prefix!r})' if prefix else 'the checkpoint')
    for key, value in module.state_dict(keep_vars=True).items():
        if key not in converted:  # in a group the checkpoint may lack: it keeps its value
            state_dict[prefix + key] = value.detach()
    for name in module.resizable_checkpoint_keys:
        if prefix + name in state_dict:
            setattr(module, name, torch.empty_like(state_dict[prefix + name]))


def _outermost_layout_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of the submodules of ours (CheckpointLayoutMixin) not nested in another one of ours."""
    found = []
    for name, module in model.named_modules():
        if name and isinstance(module, CheckpointLayoutMixin) and \
                not any(name.startswith(outer + '.') for outer, _ in found):
            found.append((name, module))
    return found


def optional_groups(model: nn.Module) -> List[Tuple[str, str]]:
    """(prefix, pattern) of every parameter group of ``model`` a checkpoint may lack as a whole."""
    groups = [('', pattern) for pattern in ALWAYS_OPTIONAL]
    for name, module in model.named_modules():
        for pattern in getattr(module, 'optional_checkpoint_groups', ()):
            groups.append((f'{name}.' if name else '', pattern))
    return groups


def _in_group(key: str, group: Tuple[str, str]) -> bool:
    prefix, pattern = group
    return key.startswith(prefix) and re.search(pattern, key[len(prefix):]) is not None


# classifier-level keys of the official / timm layouts (DeiT's distillation head, LV-ViT's token head, timm's fc_norm);
# mmpretrain heads hold the same Linear under the names below
OFFICIAL_HEAD_PREFIXES = ('head.', 'aux_head.', 'head_dist.', 'fc_norm.')
_HEAD_LAYOUTS = (  # (a key of the model's head, official prefix -> ours)
    ('head.cls_fc.weight', {'head.': 'head.cls_fc.', 'aux_head.': 'head.token_fc.'}),  # TokenLabelingClsHead
    ('head.layers.head.weight', {'head.': 'head.layers.head.'}),  # VisionTransformerClsHead
    ('head.fc.weight', {'head.': 'head.fc.'}),  # LinearClsHead
)


def official_classifier_to_model(model: nn.Module, state_dict: StateDict) -> StateDict:
    """An official / timm classifier (backbone keys at the top, ``head.*``) -> ``backbone.*`` + the model's head."""
    own = model.state_dict()
    renames = next((layout for key, layout in _HEAD_LAYOUTS if key in own), {})
    backbone, head = {}, {}
    for key, value in state_dict.items():
        official = next((p for p in OFFICIAL_HEAD_PREFIXES if key.startswith(p)), None)
        if official is None:
            backbone[key] = value
        else:
            head[renames[official] + key[len(official):] if official in renames else key] = value
    converted = {f'backbone.{k}': v for k, v in model.backbone.convert_checkpoint(backbone).items()}
    return {**converted, **head}


def convert_for_model(model: nn.Module, checkpoint: Union[dict, StateDict]) -> StateDict:
    """A checkpoint of any supported layout -> ``model``'s keys (not yet checked: see :func:`check_fit`).

    * a model of ours converts the whole checkpoint itself (DVT, U-ViT diffusion, backbones);
    * a framework model (mmpretrain classifier, mmdet detector, mmseg segmentor) whose backbone is ours takes an
      official / timm classifier checkpoint (no ``backbone.`` keys) as backbone + head, and otherwise has each
      submodule of ours convert its own keys (mmpretrain ViT names, official Swin names, ...).
    """
    state_dict = unwrap_state_dict(checkpoint)
    whole = checkpoint if isinstance(checkpoint, dict) else None
    if isinstance(model, CheckpointLayoutMixin):
        return model.convert_checkpoint(state_dict, whole)
    return convert_framework_model_layout(model, state_dict)


def convert_framework_model_layout(model: nn.Module, state_dict: StateDict) -> StateDict:
    """For a framework model (classifier, detector, segmentor) with a backbone of ours: an official / timm classifier
    checkpoint (no ``backbone.`` keys) becomes backbone + head; otherwise each submodule of ours converts its keys."""
    if isinstance(getattr(model, 'backbone', None), CheckpointLayoutMixin) and \
            not any(k.startswith('backbone.') for k in state_dict):
        return official_classifier_to_model(model, state_dict)
    state_dict = dict(state_dict)
    for name, module in _outermost_layout_modules(model):
        module.adopt_checkpoint_layout(state_dict, f'{name}.')
    return state_dict


def check_fit(model: nn.Module, state_dict: StateDict, source: str = 'the checkpoint',
              allow_absent: Iterable[str] = ()) -> List[str]:
    """Refuse weights that do not fit ``model``, naming the missing / unexpected / mis-shaped keys.

    The model's declared optional groups (see :class:`CheckpointLayoutMixin`) and ``allow_absent`` (regular
    expressions on the model's keys, e.g. ``'^head\\.'`` when only a backbone initialises a classifier) may be
    absent as a whole; a group that is partly present must be complete. Returns the absent groups' patterns.
    """
    own = model.state_dict()
    groups = optional_groups(model) + [('', pattern) for pattern in allow_absent]
    absent = [g for g in groups if any(_in_group(k, g) for k in own) and not any(_in_group(k, g) for k in state_dict)]
    missing = [k for k in own if k not in state_dict and not any(_in_group(k, g) for g in absent)]
    unexpected = [k for k in state_dict if k not in own]
    resizable = {f'{name}.{key}' if name else key for name, module in model.named_modules()
                 for key in getattr(module, 'resizable_checkpoint_keys', ())}
    mis_shaped = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state_dict.items()
                  if k in own and k not in resizable and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mis_shaped:
        parts = [f'{source} does not fit {type(model).__name__}']
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('shape mismatches', mis_shaped)):
            if keys:
                shown = ', '.join(keys[:20]) + (f', ... ({len(keys)} in all)' if len(keys) > 20 else '')
                parts.append(f'{title}: {shown}')
        raise CheckpointMismatchError('; '.join(parts))
    # readable names for the log: 'backbone.score_predictors.' for the pattern '^score_predictors\.' of the backbone
    return sorted({prefix + re.sub(r'\\(.)', r'\1', pattern.strip('^$')) for prefix, pattern in absent
                   if pattern not in ALWAYS_OPTIONAL})


def load_weights(model: nn.Module, checkpoint: Union[str, dict], prefix: Optional[str] = None,
                 allow_absent: Sequence[str] = (), source: Optional[str] = None) -> List[str]:
    """The one way in: read ``checkpoint`` (a path or a loaded dict), convert it, check the fit, load it.

    Args:
        prefix: take only the keys under this prefix (e.g. ``'backbone.'`` of a detector checkpoint).
        allow_absent: model keys the checkpoint may lack as a whole besides the declared optional groups.
        source: how errors name the checkpoint (default: its path).
    Returns the optional groups the checkpoint lacked (they keep their current values).
    """
    if isinstance(checkpoint, str):
        source = source or checkpoint
        checkpoint = load_checkpoint_file(checkpoint)
    source = source or 'the checkpoint'
    if prefix:
        checkpoint = select_prefix(unwrap_state_dict(checkpoint), prefix, source)
    try:
        state_dict = convert_for_model(model, checkpoint)
        absent = check_fit(model, state_dict, source, allow_absent)
    except CheckpointMismatchError as error:
        message = str(error)
        raise CheckpointMismatchError(message if source in message else f'{source}: {message}') from None
    for key, value in model.state_dict(keep_vars=True).items():  # what may be absent keeps its value
        state_dict.setdefault(key, value.detach())
    model.load_state_dict(state_dict)
    if absent:
        from mmengine.logging import print_log
        print_log(f'{source}: no weights for {absent}; those keep their initialisation', logger='current')
    return absent


register_with_mmengine()
