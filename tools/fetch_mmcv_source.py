"""Download mmcv's source archive from PyPI: ``python tools/fetch_mmcv_source.py VERSION OUT_DIR``.

PyPI has only the source of mmcv 2.1, and ``pip download`` of a source archive runs its metadata step, which imports
torch and pkg_resources; the archive is taken from the index page instead (used by install.sh and
make_wheelhouse.sh; standard library only).
"""
import re
import sys
import urllib.request

version, out = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen('https://pypi.org/simple/mmcv/', timeout=120).read().decode()
url = re.search(r'href="([^"]*/mmcv-%s\.tar\.gz)[^"]*"' % re.escape(version), page).group(1)
urllib.request.urlretrieve(url, f'{out}/mmcv-{version}.tar.gz')
