"""`make organism`: train the organism of a profile on this CPU and export it as committed artifacts, or retrain it
from scratch and check it against them (`python -m lib.steps.export [--profile P] [--verify]`). `make seed`: the
same for one seed, then its whole pipeline to every chapter's findings row (lib/steps/seeds.py), committed beside
it, so that the book reports that seed without running its pipeline (`--findings`)."""

from __future__ import annotations

from pathlib import Path

from lib.steps.organism import MODEL_STEPS


def export_organism(profile: str, store: Path, verify: bool = False, seed: int | None = None) -> int:
    """Train (or reuse from the local cache or `store`) the organism of `profile` and copy its three artifacts into
    `store` with a PROVENANCE.json (command, seed, threads, code commit, versions, checksums). With `verify`,
    retrain from scratch in a cache of its own instead and compare every file's checksum with the committed
    artifacts. Both are resumable: a finished step is kept in its cache and the VLM's stage 2 checkpoints, so a
    killed run restarted with the same command goes on where it stopped (the verification cache is removed once it
    has passed)."""
    import json
    import platform
    import shutil
    import subprocess
    import sys

    import torch
    import transformers

    from lib.io.cache import MANIFEST, Cache, load_json
    from lib.steps.study import Study

    P = _profile(profile, seed)
    S = Study(P, Cache(stores=(store,)))  # a model the store already holds under its key is not trained again
    if P.lm is None:
        raise SystemExit(f"profile {profile!r} has no organism ([lm], [tower], [vlm] sections)")
    if verify:
        scratch = S.cache.root.parent / f"verify-{profile}-seed{P.seed}"  # beside the local cache, never the store
        arts = Study(P, Cache(scratch, stores=())).organism.artifacts
        bad = []
        for name in MODEL_STEPS:
            ours, committed = load_json(arts[name] / MANIFEST), store / arts[name].path.name / MANIFEST
            if not committed.exists():
                bad.append(f"{name}: no committed artifact {committed.parent} (settings or code changed?)")
                continue
            theirs = load_json(committed)["files"]
            # Weights and result tables must be equal bit for bit; info.json holds wall-clock times.
            differ = [f for f, meta in ours["files"].items() if f != "info.json" and theirs.get(f) != meta]
            if differ:
                bad.append(f"{name}: retrained {', '.join(differ)} differ from {committed.parent}")
        print("\n".join(bad) or f"organism of {profile!r}: retrained bit for bit equal to {store}/")
        if not bad:
            shutil.rmtree(scratch)
        return 1 if bad else 0
    # The code this process runs is the checkout as it starts (every step module is imported by then): later
    # commits or edits while it trains do not change what trains.
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "lib"], capture_output=True, text=True).stdout)
    arts = S.organism.artifacts
    store.mkdir(parents=True, exist_ok=True)
    provenance = {}
    for name in MODEL_STEPS:
        manifest = _copy_into(store, arts[name].path)
        provenance[name] = {
            "artifact": arts[name].path.name,
            "key": arts[name].key,
            "build_s": manifest["build_s"],
            "files": manifest["files"],
        }
    provenance["made_by"] = {
        "command": " ".join([Path(sys.executable).name, "-m", "lib.steps.export", *sys.argv[1:]]),
        "profile": profile,
        "seed": P.seed,
        "threads": P.threads,
        "code_commit": commit + (" (lib/ had uncommitted changes)" if dirty else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
    }
    names = ", ".join(provenance[n]["artifact"] for n in MODEL_STEPS)
    path = store / provenance_name(profile, P.seed)
    if path.exists() and all(load_json(path).get(n, {}).get("files") == provenance[n]["files"] for n in MODEL_STEPS):
        # Already exported: its provenance says which commit and command made it, and a later run must not
        # overwrite that with its own (it trained nothing, or retrained the same bits).
        print(f"organism of {profile!r} seed {P.seed} already in {store}/ ({names}); {path.name} kept")
        return 0
    path.write_text(json.dumps(provenance, indent=1, sort_keys=True))
    print(f"organism of {profile!r} exported to {store}/ ({names})")
    return 0


def export_findings(profile: str, store: Path, seed: int | None = None) -> int:
    """Run one seed's pipeline to every chapter's findings row (`seeds-<chapter>`), reusing what the local cache
    and `store` hold, and copy the rows into `store`, listed under "findings" in the seed's provenance file (beside
    its organism's, which `export_organism` writes first). The rows are small; the pipeline that makes them is not."""
    import json

    from lib.io.cache import Cache, load_json
    from lib.steps.seeds import NUMBERS
    from lib.steps.study import Study

    P = _profile(profile, seed)
    S = Study(P, Cache(stores=(store,)))
    provenance_path = store / provenance_name(profile, P.seed)
    if not provenance_path.exists():
        raise SystemExit(f"{provenance_path} is missing: export the seed's organism first (make organism)")
    provenance = load_json(provenance_path)
    provenance["findings"] = {}
    for chapter in NUMBERS:
        name = f"seeds-{chapter}"
        S.run(name)
        row = S.cache.path(name, S.keys[name])  # built or reused locally, or already in the store
        provenance["findings"][chapter] = {"artifact": row.name, "files": _copy_into(store, row)["files"]}
    provenance_path.write_text(json.dumps(provenance, indent=1, sort_keys=True))
    print(f"findings of {profile!r} seed {P.seed} exported to {store}/ ({len(NUMBERS)} chapters)")
    return 0


def _profile(profile: str, seed: int | None):
    """The profile, with `seed` in place of its own when given."""
    import dataclasses

    from lib.io.profiles import load_profile

    P = load_profile(profile)
    return P if seed is None else dataclasses.replace(P, seed=seed)


def _copy_into(store: Path, artifact: Path) -> dict:
    """Copy a cached artifact into `store` under its own name (unless the store holds it already) and return the
    stored copy's manifest."""
    import shutil

    from lib.io.cache import MANIFEST, load_json

    target = store / artifact.name
    if not target.exists():
        shutil.copytree(artifact, target)
    return load_json(target / MANIFEST)


def provenance_name(profile: str, seed: int) -> str:
    """The provenance file of a profile's organism: seed 0 keeps the name the committed organism has."""
    return f"PROVENANCE-{profile}.json" if seed == 0 else f"PROVENANCE-{profile}-seed{seed}.json"


if __name__ == "__main__":
    import argparse

    from lib.io.cache import COMMITTED

    parser = argparse.ArgumentParser(prog="python -m lib.steps.export", description="Train and export the organism.")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--store", type=Path, default=COMMITTED)
    parser.add_argument("--verify", action="store_true", help="retrain from scratch and compare with the store")
    parser.add_argument("--seed", type=int, help="train with this seed instead of the profile's")
    parser.add_argument("--findings", action="store_true", help="then run the seed's pipeline and export its rows")
    args = parser.parse_args()
    status = export_organism(args.profile, args.store, args.verify, args.seed)
    if args.findings and not args.verify and status == 0:
        status = export_findings(args.profile, args.store, args.seed)
    raise SystemExit(status)
