"""Fetch what a profile needs from the Hugging Face hub ahead of a run, so that `make book` can stay offline.

    python -m lib.io.download --profile paper --dry-run   # the plan: what would be fetched, sizes where known
    python -m lib.io.download --profile paper             # fetch it (needs the hub: HF_HUB_OFFLINE=0)

`make download PROFILE=paper` runs the second. The plan and the downloads are lib/sources/download.py; this module
reads the profile (sources import nothing from lib/io, so the command line lives here). Sizes come from the hub's
file lists and are asked for only when the hub is on; offline, the plan says which are unknown. Exit status: 0 done
(or nothing to fetch), 1 a download failed, 2 a mistake the user can fix (unknown profile, offline, a bad field).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.io.book import REPO_ROOT
from lib.io.profiles import Profile, ProfileError, load_profile
from lib.sources import download as D


def profile_plan(profile: Profile, root: Path = REPO_ROOT) -> list[D.Download]:
    """The downloads of a profile: everything its `[paper]` section names (none for the organism's profiles, which
    train their own models), relative paths read from `root` as the runner's kernels read them."""
    if profile.paper is None:
        return []
    return D.plan(profile.paper, profile.sae.layers, root)


def describe(items: list[D.Download]) -> str:
    """The plan as a table: field, what, source, status and size, then each note; and the totals."""
    rows = [("field", "what", "source", "status", "size")]
    rows += [(i.field, i.what, i.source or "''", i.status, D.format_size(i.size) if i.size is not None else "?")
             for i in items]  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    hub = [i for i in items if i.status == D.HUB]
    known = [i.size for i in hub if i.size is not None]
    unknown = len(hub) - len(known)
    total = "sizes unknown" if not known else D.format_size(sum(known)) + (f" + {unknown} unknown" if unknown else "")
    lines.append(
        f"\n{len(hub)} to fetch from the hub ({total}), "
        f"{sum(i.status == D.LOCAL for i in items)} already local, {sum(i.status == D.MANUAL for i in items)} to "
        f"fetch by hand, {sum(i.status == D.MISSING for i in items)} missing"
    )
    notes = [f"  {i.field} ({i.what}): {i.note}" for i in items if i.note]
    notes += [f"  {i.field} ({i.what}): fetches {_files(i)}" for i in hub if i.allow is not None or i.ignore]
    if notes:
        lines += ["notes:", *notes]
    return "\n".join(lines)


def _files(item: D.Download) -> str:
    if item.allow is None:
        return "the repository less " + ", ".join(item.ignore)
    shown = ", ".join(item.allow[:4]) + (f" and {len(item.allow) - 4} more" if len(item.allow) > 4 else "")
    return f"{len(item.allow)} file(s) or pattern(s): {shown}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.io.download", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="paper", help="profile name (lib/profiles/<name>.toml) or a .toml path")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (and sizes, when online); fetch nothing")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
        items = profile_plan(profile)
    except (ProfileError, D.DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not items:
        print(f"profile {profile.name!r} trains its own models: nothing to download")
        return 0
    if D.hub_offline():
        print("HF_HUB_OFFLINE is on: the hub is not asked, sizes of hub items are unknown\n")
    else:
        items = D.with_sizes(items)
    print(f"download plan for profile {profile.name!r}:\n{describe(items)}")
    if args.dry_run:
        return 0
    try:
        done = D.fetch(items)
    except D.DownloadError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the hub's and datasets' errors: one line, the exception's type first
        print(f"\nerror: download failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("\nfetched:\n" + "\n".join(f"  {line}" for line in done))
    print(f"`make book PROFILE={profile.name}` can now run offline (the default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
