from .dvt_metric import EarlyExitMetric

__all__ = ['EarlyExitMetric']
