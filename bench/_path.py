"""Imported by every script in bench/ before any third-party module (``import _path``).

``python bench/X.py`` puts bench/ at the front of ``sys.path``, where the scripts' own names
would shadow packages for everything imported afterwards: http.py the standard library's
``http`` (torch, requests and urllib3 need ``http.client``), napari.py ``napari``, ray.py
``ray``. Importing this module moves the folder to the end of the path, before any of them is
imported: installed packages come first, and the folder's own modules (this one, for processes
that multiprocessing spawns from a script here) are still found.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_OURS = [entry for entry in sys.path if Path(entry or ".").resolve() == _HERE]
sys.path[:] = [entry for entry in sys.path if entry not in _OURS] + _OURS
