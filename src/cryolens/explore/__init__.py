"""The embedding explorer behind ``cryolens explore``: a table of embeddings served as a map in
the browser, with each particle's slices, its neighbours, groups and exports.

Modules, each one job, imports one way down (``app`` uses the rest; none imports ``app``):

- :mod:`~cryolens.explore.table`: the Parquet table of ``cryolens embed``, its columns, search
- :mod:`~cryolens.explore.layout`: 2-D layouts (PCA; UMAP, PaCMAP when installed), cached
- :mod:`~cryolens.explore.neighbours`: exact k nearest rows in embedding space (numpy)
- :mod:`~cryolens.explore.clusters`: k-means and HDBSCAN (scikit-learn) as columns
- :mod:`~cryolens.explore.sources`: a row's particle read again from its source
- :mod:`~cryolens.explore.particles`: its reconstruction, and PNGs of their central slices
- :mod:`~cryolens.explore.exports`: a selection as CSV, a Parquet subset, or copick picks
- :mod:`~cryolens.explore.errors`: the explorer's errors and their HTTP status
- :mod:`~cryolens.explore.app`: the FastAPI app: ``/api`` and the page in ``static/``
"""
