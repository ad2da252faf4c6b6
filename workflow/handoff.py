"""DVC -> Snakemake hand-off: the outputs DVC has verified become finished work for Snakemake.

`dvc checkout`, `dvc pull` and `dvc exp apply` write the files they restore with new timestamps, in no
particular order. Snakemake 9 always compares an input's time with its outputs' (it falls back on a checksum
only for files under 1 MB that it made itself), so it would rerun jobs whose results are on disk. DVC knows
better: a stage whose deps and outs hash to what dvc.lock records, with every stage upstream of it likewise,
is finished. This marks the same jobs finished for Snakemake with `snakemake --touch`: their outputs are
touched in DAG order and their metadata recorded with the current params, so a later params edit still
reruns them. A stage DVC finds changed, and everything after it, is left for a real run.

    python -m workflow.handoff [snakemake options]    # scripts/run.sh runs it before Snakemake
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from workflow.cli import run
from workflow.errors import StepError


def verified(root: Path) -> tuple[list[str], list[str]]:
    """(the outputs of every stage that DVC finds up to date together with all stages upstream of it, the
    names of the other stages)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        changed = set(repo.status())  # stage name -> what differs from dvc.lock; up-to-date stages are absent
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        outs, left = [], []
        for stage in graph.nodes:
            upstream = {s.addressing for s in nx.descendants(graph, stage)} | {stage.addressing}
            if upstream & changed:
                left.append(stage.addressing)
            else:
                outs += [str(out.def_path) for out in stage.outs]
    return sorted(outs), sorted(left)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow.handoff", description=__doc__.splitlines()[0],
                                epilog="Other options go to Snakemake's Snakefile checks, e.g. --resources gpu=2.")
    _, snakemake_args = p.parse_known_args(argv)
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        raise StepError("no .dvc/ and dvc.yaml here; run `python -m workflow.handoff` in the project's root")
    outs, left = verified(Path.cwd())
    if left:
        print(f"DVC finds {len(left)} stage(s) not up to date (left for Snakemake to run): "
              + ", ".join(left[:6]) + (", …" if len(left) > 6 else ""), file=sys.stderr)
    if not outs:
        return 0
    # Targets first: --quiet takes the arguments that follow it.
    cmd = [sys.executable, "-m", "snakemake", *outs, "--touch", "--cores", "1", "--rerun-incomplete",
           *snakemake_args, "--quiet", "all"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise StepError(f"`snakemake --touch` failed ({proc.returncode}): {said[-1] if said else 'no output'}")
    print(f"{len(outs)} output(s) DVC verified are finished work for Snakemake", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
