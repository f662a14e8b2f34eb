"""CHGGen: host-guided inpainting generation on symmetrized frameworks (paper 002).

Modules: ``settings`` (ChgGenSettings, ChgGenSpec), ``lattice`` (random lattices at N·V0),
``symmetrize`` (guest removal + spglib refinement at rising tolerance), ``inpaint`` (client
of the MatterGen worker's RePaint), ``metrics`` (symmetry success rate, ΔE/RMSD, E_d,
RDF/CN), ``flow`` (Makers, ``chggen_flow``), ``cli`` (``cscflow chggen``).
"""

from cscflow.chggen.settings import ChgGenSettings, ChgGenSpec, load_chggen_spec

__all__ = ["ChgGenSettings", "ChgGenSpec", "load_chggen_spec"]
