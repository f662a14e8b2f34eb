"""Logging and warning filters for every ``cscflow`` command.

Its own module so that commands living next to their code (chggen, report, downstream)
set up logging the same way without importing the command-line group.
"""

from __future__ import annotations

import logging
import sys
import warnings

__all__ = ["configure_logging"]


def configure_logging() -> None:
    """INFO to stdout with timestamps; library chatter silenced."""
    # Library deprecation chatter (monty's cd in jobflow, pymatgen, torch) is not the user's business.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # ASE's FrechetCellFilter takes logm of near-identity deformations; scipy warns at errors ~1e-13.
    warnings.filterwarnings("ignore", message="logm result may be inaccurate")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    for noisy in ("matplotlib", "numba", "urllib3", "h5py", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
