"""Analysis of a run (paper §2.1–2.4): anion motifs, fingerprints and t-SNE maps, phase diagrams, the report.

Submodules are imported on use (matplotlib, scikit-learn and matminer are heavy):
``cscflow.analysis.motifs``, ``.fingerprints``, ``.maps``, ``.phase_diagrams``, ``.figures``;
the report: ``.run_data`` (store loading), ``.report_html``, ``.parity``, ``.report``, ``.report_cli``.
"""

__all__ = [
    "figures", "fingerprints", "maps", "motifs", "parity", "phase_diagrams", "plotting",
    "report", "report_cli", "report_html", "run_data",
]
