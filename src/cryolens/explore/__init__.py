"""The embedding explorer behind ``cryolens explore``: a table of embeddings served as a map in
the browser, with each particle's slices, its neighbours, groups and exports.

Modules, each one job, imports one way down (``app`` uses the rest; none imports ``app``):

- :mod:`~cryolens.explore.table`: the Parquet table of ``cryolens embed``, its columns, search
- :mod:`~cryolens.explore.layout`: 2-D layouts (PCA; UMAP, PaCMAP when installed), cached
- :mod:`~cryolens.explore.neighbours`: exact k nearest rows in embedding space (numpy)
- :mod:`~cryolens.explore.clusters`: k-means (numpy) and HDBSCAN (scikit-learn) as columns
- :mod:`~cryolens.explore.particles`: a row's particle read from its source, its
  reconstruction, and PNG pictures of their central slices
- :mod:`~cryolens.explore.exports`: a selection as CSV, a Parquet subset, or copick picks
- :mod:`~cryolens.explore.app`: the FastAPI app: ``/api`` and the page in ``static/``
"""
