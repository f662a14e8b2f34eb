"""Labelling granularity on a real LaunchPad: one Firework per structure vs one per DFT calculation.

Not a test: a measurement (issue 13, item 2). A paper iteration labels 600 structures; as
one Firework per calculation (CP2K: 3 relaxations + 5 statics) that is 4,800 Fireworks plus
a collector, as one per structure's protocol 600 plus a collector. FireWorks keeps one
workflow document (links, states) that it rewrites on every completion, so its size and the
per-job overhead grow with the Fireworks in the workflow (7 iterations in one workflow).

For each granularity and for 1 and ``--iterations`` iterations' worth of label Fireworks in
one workflow, this adds the workflow to a fresh LaunchPad on a MongoDB-wire server
(``--uri``, default: a ``secantusd-py`` started in a temp dir), then runs ``--launches``
Fireworks with a no-op task through FireWorks' own ``launch_rocket`` (checkout, run,
complete, workflow refresh) and prints add time, seconds per launch and the workflow
document's size. Usage, from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fireworks_granularity.py --structures 600 --iterations 7
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def label_workflow(n_structures: int, per_structure: int, iterations: int):
    """`iterations` label fan-outs of `n_structures` x `per_structure` no-op Fireworks + a collector each."""
    from fireworks import Firework, ScriptTask, Workflow

    fws, links = [], {}
    for it in range(iterations):
        units = [Firework(ScriptTask.from_str("true"), name=f"it{it} label {s}/{k}")
                 for s in range(n_structures) for k in range(per_structure)]
        collect = Firework(ScriptTask.from_str("true"), name=f"it{it} collect")
        for u in units:
            links[u] = [collect]
        fws += [*units, collect]
    return Workflow(fws, links_dict={fw.fw_id: [c.fw_id for c in cs] for fw, cs in links.items()}, name="label")


def measure(uri: str, n_structures: int, per_structure: int, iterations: int, launches: int) -> dict:
    import bson
    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import launch_rocket

    name = f"gran_{per_structure}_{iterations}_{os.getpid()}"
    lp = LaunchPad(host=uri, uri_mode=True, name=name, strm_lvl="CRITICAL")
    lp.reset("", require_password=False)
    wf = label_workflow(n_structures, per_structure, iterations)
    t0 = time.perf_counter()
    lp.add_wf(wf)
    add_s = time.perf_counter() - t0
    doc = lp.workflows.find_one({})
    size = len(bson.encode({k: v for k, v in doc.items() if k != "_id"}))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            t0 = time.perf_counter()
            for _ in range(launches):
                launch_rocket(lp, FWorker(), strm_lvl="CRITICAL")
            per_launch = (time.perf_counter() - t0) / launches
        finally:
            os.chdir(cwd)
    lp.connection.drop_database(name)
    return {"fireworks": len(wf.fws), "add_s": add_s, "per_launch_s": per_launch, "wf_doc_kb": size / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--structures", type=int, default=600)
    parser.add_argument("--calculations", type=int, default=8, help="DFT calculations per structure (3 + 5)")
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--launches", type=int, default=30)
    parser.add_argument("--uri", default=None, help="MongoDB URI (default: a secantusd-py in a temp dir)")
    args = parser.parse_args()
    server = None
    uri = args.uri
    if uri is None:
        from cscflow.localserver import LocalServer

        server = LocalServer(Path(tempfile.mkdtemp(prefix="cscflow-bench-db-"))).start()
        uri = server.uri
    print(f"# benchmarks/fireworks_granularity.py --structures {args.structures} --calculations {args.calculations} "
          f"--iterations {args.iterations} --launches {args.launches}; server {'secantusd-py (local)' if server else 'given URI'}; "
          f"{os.cpu_count()} cores")
    print("| granularity | iterations in the workflow | Fireworks | add_wf s | s per launch | workflow document KB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    try:
        rows = {}
        for label, per in (("per structure", 1), ("per calculation", args.calculations)):
            for its in sorted({1, args.iterations}):
                m = measure(uri, args.structures, per, its, args.launches)
                rows[(label, its)] = m
                print(f"| {label} | {its} | {m['fireworks']} | {m['add_s']:.1f} | {m['per_launch_s']:.3f} | "
                      f"{m['wf_doc_kb']:.0f} |", flush=True)
        a, b = rows[("per structure", args.iterations)], rows[("per calculation", args.iterations)]
        print(f"ratio per calculation / per structure at {args.iterations} iterations: Fireworks "
              f"{b['fireworks'] / a['fireworks']:.1f}x, s per launch {b['per_launch_s'] / a['per_launch_s']:.1f}x, "
              f"workflow document {b['wf_doc_kb'] / a['wf_doc_kb']:.1f}x")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
