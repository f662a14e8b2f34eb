"""cscflow: chemical-space completeness flows (generative models + MLFFs + DFT in a jobflow loop)."""

__version__ = "0.1.0"
