from .hooks import FreezeBackboneHook, KeepRatioLossHook

__all__ = ['FreezeBackboneHook', 'KeepRatioLossHook']
