"""Imported by every script in bench/ before any third-party module (``import _path``).

``python bench/X.py`` puts bench/ at the front of ``sys.path``, where the scripts' own names
would shadow packages for everything imported afterwards: http.py the standard library's
``http`` (torch, requests and urllib3 need ``http.client``), napari.py ``napari``, ray.py
``ray``. Importing this module takes the folder off the path again, before any of them is
imported.
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
