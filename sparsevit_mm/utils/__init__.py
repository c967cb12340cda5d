from .checkpoint import (CheckpointLayoutMixin, CheckpointMismatchError, allow_mmengine_checkpoints, check_fit,
                         convert_for_model, load_checkpoint_file, load_state_dict_file, load_weights,
                         unwrap_state_dict)

__all__ = ['CheckpointLayoutMixin', 'CheckpointMismatchError', 'allow_mmengine_checkpoints', 'check_fit',
           'convert_for_model', 'load_checkpoint_file', 'load_state_dict_file', 'load_weights', 'unwrap_state_dict']
