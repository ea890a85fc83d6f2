"""--top-k parsed once into a count or a fraction; named presets whose values explicit flags override."""

import sys

import pytest

from lcc_jax.restore.config import PRESETS, RestoreConfig, preset
from lcc_jax.restore.top_k import HeadCount, HeadFraction, TopK


@pytest.mark.parametrize("given, want", [("68", 68), (68, 68), ("0.25", 0.25), ("25%", 0.25), (0.25, 0.25),
                                         ("1.0", 1.0), (1.0, 1.0), ("100%", 1.0), (68.0, 68), ("1", 1)])
def test_top_k_parses_to_a_count_or_a_fraction(given, want):
    got = TopK.parse(given)
    assert got == want and type(got) is (HeadFraction if isinstance(want, float) else HeadCount)
    assert got.is_fraction == isinstance(want, float) and TopK.parse(got) is got and repr(got) == repr(want)


def test_top_k_one_point_zero_means_every_head_and_one_means_one():
    assert TopK.parse("1.0").resolve(270) == 270
    assert TopK.parse("1").resolve(270) == 1
    assert RestoreConfig(top_k="1.0").top_k == 1.0 and RestoreConfig(top_k="12").top_k == 12


@pytest.mark.parametrize("bad", ["0", "-3", "1.5", "abc", "150%", True, 0.0])
def test_bad_top_k_is_refused_with_a_hint(bad):
    with pytest.raises(ValueError, match="top_k"):
        TopK.parse(bad)


def test_presets_build_configs_and_unknown_ones_are_refused():
    assert preset("paper") == RestoreConfig()
    recipe = preset("recipe", seed=3)
    assert recipe.top_k == 1.0 and recipe.learning_rate == PRESETS["recipe"]["learning_rate"] and recipe.seed == 3
    with pytest.raises(ValueError, match="unknown preset"):
        preset("best")


def test_restore_script_preset_sets_defaults_and_explicit_flags_win():
    from lcc_jax.cli import dataclass_from_flags

    sys.path.insert(0, "scripts")
    try:
        import restore
    finally:
        sys.path.pop(0)
    config = lambda *argv: dataclass_from_flags(RestoreConfig, restore.parse_args(list(argv)))  # noqa: E731
    assert config() == RestoreConfig()
    assert (config("--preset", "recipe").top_k, config("--preset", "recipe").learning_rate) == (1.0, 5e-3)
    assert config("--preset", "recipe", "--learning-rate", "1e-2").learning_rate == 1e-2
    assert config("--preset", "recipe", "--top-k", "0.5").top_k == 0.5


def test_recovery_benchmark_knows_the_recipe_as_a_method():
    from lcc_jax.benchmark.config import METHODS
    from lcc_jax.benchmark.methods import RUNNERS
    from lcc_jax.benchmark.table import METHOD_LABELS

    assert "restorelcc_recipe" in METHODS and "restorelcc_recipe" in RUNNERS and "restorelcc_recipe" in METHOD_LABELS
