"""Builders the test modules share: stores, data on disk, tiny configs and runs, subprocesses.

- ``stores``: the one store writer (:func:`~tests.helpers.stores.write_store`) and the three
  kinds of tiny store the tests train and evaluate on; byte-level store comparison.
- ``data``: videos on disk (frame folders, video files, HDF5) and in memory, and small configs.
- ``runs``: tiny stage-2 / stage-3 configs, recorded dVAE runs, a real trained slot run.
- ``shards``: webdataset tar shards written the way SlotContrast's scripts write them.
- ``crashkit``: running the real CLI in subprocesses and killing it at chosen moments.

Test modules import from here, never from each other.
"""
