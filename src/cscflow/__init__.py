"""cscflow: chemical-space completeness flows (generative models + MLFFs + DFT in a jobflow loop)."""

from cscflow.threads import prepare as _prepare_threads

__version__ = "0.1.0"

# Before torch/numba are imported by any stage: they read their thread counts once.
_prepare_threads()
