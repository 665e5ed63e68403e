"""Target profiles: built-ins validate; errors name the file and the key."""

import pytest

from kdeploy.errors import ProfileError
from kdeploy.profiles import builtin_names, load_profile_file, resolve_profile


def test_builtin_profiles_all_validate():
    names = builtin_names()
    assert {"cpu-edge", "cpu-server", "mobile", "mcu"} <= set(names)
    for name in names:
        p = resolve_profile(name)
        assert p.name == name
        assert set(p.precisions) <= set(p.tolerances)


def test_resolve_profile_unknown_target_names_allowed_ones():
    with pytest.raises(ProfileError, match=r"unknown target 'gpu-huge'.*cpu-edge"):
        resolve_profile("gpu-huge")


def test_resolve_profile_requires_exactly_one_source(tmp_path):
    with pytest.raises(ProfileError, match="exactly one"):
        resolve_profile()
    with pytest.raises(ProfileError, match="exactly one"):
        resolve_profile("cpu-edge", tmp_path / "x.toml")


def test_load_profile_unknown_key_names_file_and_key(quick_profile):
    path = quick_profile(budgets={"max_size_bytes": 1000, "max_sise_mb": 3})
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    msg = str(e.value)
    assert str(path) in msg and "budgets.max_sise_mb" in msg and "max_size_bytes" in msg


def test_load_profile_impossible_value_names_key_and_value(quick_profile):
    path = quick_profile(budgets={"max_latency_ms": -5})
    with pytest.raises(ProfileError, match=r"budgets.max_latency_ms.*-5"):
        load_profile_file(path)


def test_load_profile_missing_tolerance_for_allowed_precision(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "x"\nruntimes = ["litert"]\nprecisions = ["fp32", "int8"]\n[tolerances.fp32]\natol = 1e-5\n')
    with pytest.raises(ProfileError, match=r"tolerances missing.*int8"):
        load_profile_file(path)


def test_load_profile_bad_toml_is_profile_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("name = [unclosed\n")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(path)
