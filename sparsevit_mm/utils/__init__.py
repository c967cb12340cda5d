from .checkpoint import (CheckpointMismatchError, allow_mmengine_checkpoints, load_checkpoint_file,
                         load_state_dict_checked, load_state_dict_file, unwrap_state_dict)

__all__ = ['CheckpointMismatchError', 'allow_mmengine_checkpoints', 'load_checkpoint_file', 'load_state_dict_checked',
           'load_state_dict_file', 'unwrap_state_dict']
