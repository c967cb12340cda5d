from .hooks import FreezeBackboneHook

__all__ = ['FreezeBackboneHook']
