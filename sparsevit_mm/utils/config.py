"""Reading configs: mmpretrain / mmdet / mmseg ones, ours, and ``'mmpretrain::...'`` package paths."""
import os.path as osp
from typing import Optional

from mmengine.config import Config


def read_config(path: str) -> Config:
    """``Config.fromfile`` that also takes ``'mmpretrain::deit/deit-small_4xb256_in1k.py'``-style paths."""
    if '::' in path:
        from mmengine.hub import get_config
        return get_config(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path} does not exist')
    return Config.fromfile(path)


def load_config(path: str, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = 'none') -> Config:
    """Read a config (mmpretrain / mmdet / mmseg or ours) and apply CLI overrides.

    ``sparsevit_mm`` is added to ``custom_imports`` so an upstream config with only the backbone swapped finds our
    models; the work dir is CLI > config > ``./work_dirs/<config name>``.
    """
    cfg = read_config(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    imports = cfg.get('custom_imports', dict(imports=[], allow_failed_imports=False))
    names = imports.get('imports', [])
    names = [names] if isinstance(names, str) else list(names)
    if 'sparsevit_mm' not in names:
        imports['imports'] = names + ['sparsevit_mm']
        cfg.custom_imports = imports
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path.split('::')[-1]))[0])
    cfg.launcher = launcher
    return cfg
