"""routelens collector: ingest, storage, queries and export. Never imports Ray:
a collector host needs only `pip install "routelens[server]"`."""

from importlib.metadata import version

__version__ = version("routelens")
