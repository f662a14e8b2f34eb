"""What a spec needs from this machine, checked before any work is done.

``cscflow validate`` and the start of ``explore``/``submit`` call :func:`check_prerequisites`:
the results store (reachable, no literal credentials), the labeller's program (VASP,
CP2K) and the seed files. A problem is one line in a :class:`SpecError`; all problems
are reported at once. They are problems of the spec or the machine, so ``resume`` cannot
help: the message says to fix the spec and start again.
"""

from __future__ import annotations

from cscflow.config import ExplorationSpec, SpecError

__all__ = ["FIX_SPEC", "check_prerequisites"]

FIX_SPEC = "fix the spec and start again"


def _store_problems(spec: ExplorationSpec) -> list[str]:
    from cscflow.stores import StoreError, check_store

    try:
        check_store(spec.store)
    except StoreError as exc:
        return [str(exc)]
    return []


def _labeller_problems(spec: ExplorationSpec) -> list[str]:
    backend = spec.labeller.backend
    try:
        if backend == "vasp":
            from cscflow.label.vasp import check_vasp_command

            check_vasp_command()
        elif backend == "cp2k":
            from cscflow.label.cp2k import cp2k_command

            cp2k_command(spec.labeller.cp2k)
    except RuntimeError as exc:  # VaspNotFoundError, CP2KNotFoundError
        return [f"labeller.backend {backend}: {exc}"]
    return []


def _seed_problems(spec: ExplorationSpec) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the seed files: a listed file that cannot be read is an error;
    unusable structures in it are warnings or errors as ``seed_errors`` says."""
    from cscflow.structures_io import StructureReadError, load_seed_files, read_structures

    errors, readable = [], []
    for path in spec.seeds:
        try:
            read_structures(path)
        except StructureReadError as exc:
            errors.append(f"seeds: {exc}")
        else:
            readable.append(path)
    elements = spec.chemical_system.elements
    seeds, problems = load_seed_files(readable, elements, on_error="skip")
    if spec.seed_errors == "raise":
        return errors + [f"seeds (seed_errors: raise): {p}" for p in problems], []
    warnings = [f"seeds: skipping {p}" for p in problems]
    if errors or spec.use_prototypes or spec.materials_project:
        return errors, warnings
    if not seeds:
        errors.append(
            f"seeds: none of the {len(spec.seeds)} seed file(s) holds a usable structure and use_prototypes is "
            "false: iteration 0 has no reference structures; add seed files in the chemical system "
            "or set use_prototypes: true" if spec.seeds else
            "iteration 0 has no reference structures: set use_prototypes: true, list seed files under seeds, "
            "or set materials_project: true"
        )
    else:
        present = {el.symbol for s in seeds for el in s.structure.composition.elements}
        missing = sorted(set(elements) - present)
        if missing:
            errors.append(f"seeds: no seed structure contains {', '.join(missing)} and use_prototypes is false: "
                          "the hull needs every element; add seed files with those elements")
    return errors, warnings


def check_prerequisites(spec: ExplorationSpec, labeller: bool = True) -> list[str]:
    """Raise SpecError (one line per problem) if the spec cannot run; return warnings.

    ``labeller=False`` (``submit``): the DFT program runs on the workers, not here."""
    seed_errors, warnings = _seed_problems(spec)
    errors = [*_store_problems(spec), *(_labeller_problems(spec) if labeller else []), *seed_errors]
    if errors:
        raise SpecError("\n".join(f"{e} ({FIX_SPEC})" for e in errors))
    return warnings
