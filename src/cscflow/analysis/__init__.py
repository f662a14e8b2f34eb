"""Analysis of a run (paper §2.1–2.4): anion motifs, fingerprints and t-SNE maps, phase diagrams.

Submodules are imported on use (matplotlib, scikit-learn and matminer are heavy):
``cscflow.analysis.motifs``, ``.fingerprints``, ``.maps``, ``.phase_diagrams``.
"""

__all__ = ["fingerprints", "maps", "motifs", "phase_diagrams"]
