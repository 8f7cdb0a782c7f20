"""egoslots: unsupervised object-centric learning on egocentric video.

The repository's top-level folders are this package's sub-packages once installed
(`pip install -e .` maps this folder to `egoslots`): `egoslots.pipeline` (model maths, data
sources), `egoslots.cache` (feature stores), `egoslots.stages` (one module per command, with
their shared machinery in `egoslots.stages.machinery`) and `egoslots.cli` (the command line).
docs/architecture.md is the map.
"""
