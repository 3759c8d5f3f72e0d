"""cir: composed image retrieval on Ray.

The library behind the jobs in `jobs/` and the Serve app in `serve/`. Importing it
never starts or joins a Ray cluster.
"""
__version__ = "0.1.0"
