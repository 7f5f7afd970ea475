"""Profiles: every shipped profile loads; every mistake a user can make names the file and the field."""

import pytest

from lib.io.profiles import ProfileError, available_profiles, load_profile


def test_shipped_profiles_load():
    assert {"tiny", "default", "paper"} <= set(available_profiles())
    for name in available_profiles():
        assert load_profile(name).name == name


def _write(tmp_path, text):
    p = tmp_path / "mine.toml"
    p.write_text(text)
    return p


BASE = 'description = "x"\nseed = 0\n'


def test_misspelt_field_names_file_and_field(tmp_path):
    p = _write(tmp_path, BASE + "[world]\ncell_pz = 16\n")
    with pytest.raises(ProfileError, match=r"mine\.toml.*world\.cell_pz.*allowed fields: cell_px"):
        load_profile(p)


def test_out_of_range_value_names_field_and_range(tmp_path):
    p = _write(tmp_path, BASE + "[world]\ncell_px = 500\n")
    with pytest.raises(ProfileError, match=r"mine\.toml.*world\.cell_px.*500.*\[4, 64\]"):
        load_profile(p)


def test_wrong_type_is_rejected(tmp_path):
    p = _write(tmp_path, BASE + '[world]\ncell_px = "big"\n')
    with pytest.raises(ProfileError, match=r"world\.cell_px.*'big'"):
        load_profile(p)


def test_cross_field_rule(tmp_path):
    p = _write(tmp_path, BASE + "[world]\ncell_px = 16\npatch_px = 6\n")
    with pytest.raises(ProfileError, match=r"mine\.toml.*world\.patch_px.*divisor of cell_px"):
        load_profile(p)


def test_unknown_section_and_missing_profile(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown field `wrold`"):
        load_profile(_write(tmp_path, BASE + "[wrold]\ncell_px = 16\n"))
    with pytest.raises(ProfileError, match=r"available: .*default"):
        load_profile("no-such-profile")


def test_profile_needs_exactly_one_setting(tmp_path):
    with pytest.raises(ProfileError, match="exactly one"):
        load_profile(_write(tmp_path, BASE))


def test_organism_section_errors_name_the_section(tmp_path):
    text = BASE + "[world]\ncell_px = 16\n[lm]\nd_model = 100\n[tower]\n[vlm]\n"
    with pytest.raises(ProfileError, match=r"mine\.toml.*\[lm\].*d_model must equal n_heads \* head_dim"):
        load_profile(_write(tmp_path, text))
    with pytest.raises(ProfileError, match=r"mine\.toml.*unknown field `lm\.dmodel`"):
        load_profile(_write(tmp_path, BASE + "[world]\n[lm]\ndmodel = 128\n[tower]\n[vlm]\n"))


def test_organism_needs_all_its_sections_and_a_matching_world(tmp_path):
    with pytest.raises(ProfileError, match="needs all of the sections"):
        load_profile(_write(tmp_path, BASE + "[world]\n[lm]\n"))
    with pytest.raises(ProfileError, match=r"tower\.patch.*world\.cell_px"):
        load_profile(_write(tmp_path, BASE + "[world]\ncell_px = 8\n[lm]\n[tower]\n[vlm]\n"))


def test_every_setting_the_book_depends_on_is_written_in_the_profile_files():
    """A reader sees every threshold where they choose a profile: no analysis value comes from a dataclass default
    alone (the paper profile leaves out only the organism's own fields)."""
    import dataclasses
    import tomllib

    from lib.io.profiles import PROFILE_DIR

    organism_only = {
        "sae": {"expansion", "k", "base_pairs", "base_lr", "base_batch_size", "adapt_pairs", "heldout_pairs"}
        | {"sweep_expansion", "sweep_k", "sweep_pairs", "sweep_every"},
        "probing": {"n_questions", "n_ground_truth"},
        "attribution": {"n_statements", "n_controls"},
        "referee": {f.name for f in dataclasses.fields(load_profile("default").referee)},
    }
    trained_base = {"expansion", "k", "base_pairs", "base_lr", "base_batch_size"}  # [paper] base_saes = "train"
    for name in available_profiles():
        raw = tomllib.loads((PROFILE_DIR / f"{name}.toml").read_text())
        P = load_profile(name)
        sections = ("world", "lm", "tower", "vlm", "paper", "sae", "diffing", "probing", "attribution", "referee")
        for section in (*sections, "distributed"):
            if getattr(P, section) is None:
                continue
            skip = organism_only.get(section, set()) if P.paper is not None else set()
            if section == "sae" and P.paper is not None and P.paper.base_saes == "train":
                skip = skip - trained_base
            missing = {f.name for f in dataclasses.fields(getattr(P, section))} - set(raw.get(section, {})) - skip
            assert not missing, f"{name}.toml [{section}] does not write {sorted(missing)}"


def test_a_profile_round_trips_through_the_json_its_distributed_workers_read(tmp_path):
    """lib/steps/distributed.py hands a profile (perhaps built in memory) to its torchrun workers as JSON."""
    import dataclasses
    import json

    from lib.io.profiles import profile_dict

    for name in available_profiles():
        P = load_profile(name)
        P = dataclasses.replace(P, sae=dataclasses.replace(P.sae, lr=3e-4))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(profile_dict(P)))
        assert load_profile(path) == P


def test_distributed_section_is_checked(tmp_path):
    text = BASE + '[world]\n[distributed]\nbackend = "mpi"\n'
    with pytest.raises(ProfileError, match=r"distributed\.backend.*'gloo'"):
        load_profile(_write(tmp_path, text))
    with pytest.raises(ProfileError, match=r"distributed\.processes.*\[1, 1024\]"):
        load_profile(_write(tmp_path, BASE + "[world]\n[distributed]\nprocesses = 0\n"))
