"""Code that runs inside the MatterGen virtual environment (``.venv-mattergen``).

mattergen==1.0.3 needs numpy<2 while the main environment runs numpy 2.x, so the loop never
imports mattergen itself: ``cscflow.generators.mattergen`` starts ``python -m
cscflow.mattergen_worker`` from that environment (with ``src`` on ``PYTHONPATH``, never
``src/cscflow``: its ``select.py`` would shadow the standard library) and talks to it through JSON lines on stdin/stdout; structures travel as extxyz files.

This package therefore uses relative imports only and imports nothing from ``cscflow``
beyond its (import-free) ``__init__`` - nothing numpy-2-only. Modules:

- ``compat``: pure-PyTorch ``torch_scatter`` / ``torch_sparse`` for when the compiled
  packages are absent (CPU machines); registered before mattergen is imported;
- ``modelconf``: the model / corruption / lightning-module configuration built in Python
  (the wheel ships no hydra ``conf/`` and no GemNet scale file);
- ``core``: checkpoints (load/save), data (CSV -> mattergen's cached dataset), training from
  scratch, fine-tuning with property adapters, conditioned sampling with the lattice guard;
- ``server``: the JSON-lines request loop (``python -m cscflow.mattergen_worker``).
"""

PROTOCOL_VERSION = 1
