"""Structure fingerprints for maps (paper SI §1.1, Supp. Fig. 2, Fig. 4a).

Per site: matminer's CrystalNNFingerprint "ops" preset (61 weighted order parameters), with
oxidation states guessed by pymatgen so CrystalNN can use ionic radii. Structure
fingerprint = mean over sites; the Li-removed variant averages over the anion framework
only (oxidation states are guessed on the full structure first). A structure whose
oxidation states cannot be guessed falls back to CrystalNN without them and is flagged;
a structure that cannot be fingerprinted at all gets a NaN row and is flagged, never raised.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import warnings
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pymatgen.core import Structure

__all__ = [
    "FingerprintCache",
    "FingerprintResult",
    "fingerprint_structures",
    "guess_oxidation_states",
    "structure_fingerprint",
    "structure_key",
]

logger = logging.getLogger(__name__)

# pymatgen's exhaustive guess is combinatorial in the atoms per formula unit (a 125-atom
# Li48P16S61 cell does not finish in minutes); above this size one valence per element is tried.
_EXHAUSTIVE_MAX_ATOMS = 24


def _featurizer():
    """matminer's structure-level preset, mean only (the paper's fingerprint is the site mean)."""
    from matminer.featurizers.structure import SiteStatsFingerprint

    return SiteStatsFingerprint.from_preset("CrystalNNFingerprint_ops", stats=("mean",))


def n_features() -> int:
    return len(_featurizer().feature_labels())


def structure_key(structure: Structure, decimals: int = 4) -> str:
    """Content hash of a structure (lattice, species, fractional coordinates)."""
    payload = [np.round(structure.lattice.matrix, decimals).tolist()]
    payload += [(str(s.species), np.round(s.frac_coords % 1.0, decimals).tolist()) for s in structure]
    return hashlib.sha1(repr(payload).encode()).hexdigest()


def guess_oxidation_states(structure: Structure) -> dict[str, float] | None:
    """A charge-balanced oxidation state per element, or None when there is none (or only zeros)."""
    from pymatgen.core.periodic_table import Element

    composition = structure.composition.reduced_composition
    if len(composition.elements) < 2:
        return None
    guess = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if composition.num_atoms <= _EXHAUSTIVE_MAX_ATOMS:
            guesses = composition.oxi_state_guesses()
            guess = dict(guesses[0]) if guesses else None
        else:
            symbols = [el.symbol for el in composition.elements]
            options = [Element(s).common_oxidation_states or (0,) for s in symbols]
            for states in itertools.product(*options):
                if abs(sum(q * composition[s] for q, s in zip(states, symbols))) < 1e-6:
                    guess = dict(zip(symbols, map(float, states)))
                    break
    if not guess or all(abs(v) < 1e-12 for v in guess.values()):
        return None
    return guess


def structure_fingerprint(
    structure: Structure, remove_li: bool = False, featurizer=None
) -> tuple[np.ndarray, bool]:
    """(mean CrystalNN "ops" fingerprint over sites, whether oxidation states were used)."""
    featurizer = featurizer or _featurizer()
    if not structure.is_ordered:
        raise ValueError("fingerprints need an ordered structure")
    oxi = guess_oxidation_states(structure)
    attempts = ([oxi] if oxi else []) + [None]
    last_error: Exception | None = None
    for states in attempts:
        s = structure.copy()
        if states:
            s.add_oxidation_state_by_element(states)
        if remove_li:
            drop = [i for i, site in enumerate(s) if site.specie.symbol == "Li"]
            s.remove_sites(drop)
            if len(s) == 0:
                raise ValueError("no sites left after removing Li")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vector = featurizer.featurize(s)
            return np.asarray(vector, dtype=float), states is not None
        except Exception as exc:  # CrystalNN fails on some radii/species: retry without charges
            last_error = exc
            logger.debug("CrystalNN with oxidation states %s failed: %s", states, exc)
    raise RuntimeError(f"CrystalNN fingerprint failed: {last_error}") from last_error


class FingerprintCache(MutableMapping):
    """Fingerprints by key (candidate id or structure hash) and variant; dict-like.

    Values are (vector, oxidation_states_used). `to_dict`/`from_dict` give a JSON form
    for the run store.
    """

    def __init__(self, data: dict | None = None):
        self._data: dict[str, tuple[np.ndarray, bool]] = dict(data or {})

    def __getitem__(self, key: str) -> tuple[np.ndarray, bool]:
        return self._data[key]

    def __setitem__(self, key: str, value: tuple[np.ndarray, bool]) -> None:
        vector, flag = value
        self._data[key] = (np.asarray(vector, dtype=float), bool(flag))

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def to_dict(self) -> dict[str, dict]:
        return {k: {"fingerprint": v.tolist(), "oxidation_states": f} for k, (v, f) in self._data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, dict]) -> FingerprintCache:
        return cls({k: (np.asarray(d["fingerprint"], float), bool(d["oxidation_states"])) for k, d in data.items()})


@dataclass
class FingerprintResult:
    """Fingerprints of a list of structures, one row each; failed rows are NaN."""

    keys: list[str]
    features: np.ndarray
    oxidation_states: np.ndarray = field(repr=False)
    failed: np.ndarray = field(repr=False)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> np.ndarray:
        return ~self.failed


def fingerprint_structures(
    structures: Sequence[Structure],
    keys: Sequence[str] | None = None,
    remove_li: bool = False,
    cache: MutableMapping | None = None,
) -> FingerprintResult:
    """Fingerprint every structure (cached by key); never raises on a bad structure."""
    structures = list(structures)
    if keys is None:
        keys = [structure_key(s) for s in structures]
    keys = [str(k) for k in keys]
    if len(keys) != len(structures):
        raise ValueError(f"{len(keys)} keys for {len(structures)} structures")
    featurizer = _featurizer()
    dim = len(featurizer.feature_labels())
    features = np.full((len(structures), dim), np.nan)
    ox = np.zeros(len(structures), bool)
    failed = np.zeros(len(structures), bool)
    errors: dict[str, str] = {}
    variant = "noLi" if remove_li else "all"
    for i, (key, structure) in enumerate(zip(keys, structures)):
        ckey = f"{key}|{variant}"
        if cache is not None and ckey in cache:
            features[i], ox[i] = cache[ckey]
            continue
        try:
            vector, used = structure_fingerprint(structure, remove_li=remove_li, featurizer=featurizer)
        except Exception as exc:
            failed[i] = True
            errors[key] = f"{type(exc).__name__}: {exc}"
            logger.warning("no fingerprint for %s: %s", key, exc)
            continue
        features[i], ox[i] = vector, used
        if cache is not None:
            cache[ckey] = (vector, used)
    return FingerprintResult(keys, features, ox, failed, errors)
