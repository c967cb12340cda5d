from .hooks import CheckpointLayoutHook, FreezeBackboneHook, KeepRatioLossHook
from .random_state import RandomStateHook

__all__ = ['CheckpointLayoutHook', 'FreezeBackboneHook', 'KeepRatioLossHook', 'RandomStateHook']
