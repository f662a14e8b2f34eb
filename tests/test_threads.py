"""The user's thread count holds through every stage (issue 18): numba's OpenMP pool used
to raise PyTorch's thread count to all cores after the first entropy stage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to see a change")

DIRECT = """
import torch
from pymatgen.core import Lattice, Structure
from cscflow.entropy import entropy, structure_descriptors
s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.71), ["S", "Li"], [[0, 0, 0], [.25, .25, .25]])
before = torch.get_num_threads()
entropy(structure_descriptors([s])[0])
print(before, torch.get_num_threads())
"""

# numba loaded first with all cores (as another library could): the stage must still hand
# PyTorch back its one thread.
STAGE = """
import numba, torch
from jobflow import run_locally
from cscflow.prototypes import prototype_structures
from cscflow.schemas import Candidate, Provenance
from cscflow.select import SelectMaker
cands = [
    Candidate(provenance=Provenance(candidate_id=f"c{i}", iteration=1, generator="seed"), structure=s,
              status="relaxed", e_hull=0.01 * i, is_stable=True, is_unique=True, is_novel=True)
    for i, (_, s) in enumerate(prototype_structures(["Li", "S"]))
]
before = torch.get_num_threads()
job = SelectMaker().make(cands, seed=0)
responses = run_locally(job, log=False)
assert responses[job.uuid][1].output.selected
print(before, torch.get_num_threads())
"""


def _threads_after(code: str, **env) -> tuple[int, int]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full.pop("NUMBA_NUM_THREADS", None)
    full.update(env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=full, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = map(int, out.stdout.split()[-2:])
    return before, after


def test_entropy_leaves_torch_threads_alone():
    assert _threads_after(DIRECT) == (1, 1)


def test_a_stage_restores_the_thread_count_even_if_numba_came_first(tmp_path):
    assert _threads_after(STAGE, NUMBA_NUM_THREADS=str(os.cpu_count())) == (1, 1)
