"""Imported by every tool before the frameworks: their known deprecation warnings, which no user of ours can act on,
are filtered (mmengine, mmdet and mmseg import setuptools' ``pkg_resources``; mmseg's own heads call its deprecated
``build_loss``). Everything else the frameworks print stays."""
import warnings

UPSTREAM_DEPRECATIONS = (
    r'pkg_resources is deprecated as an API',
    r'``build_loss`` would be deprecated soon',
)
for message in UPSTREAM_DEPRECATIONS:
    warnings.filterwarnings('ignore', message=message)
