"""Settings files: a typo or a wrong type is an error naming the file, never silently ignored."""

from __future__ import annotations

import pytest

from tcia_async.config import ConfigError, load_engine_config


def test_engine_table_loads_limits_per_model_limits_and_prices(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[engine]\nconcurrency = 64\n[engine.limits]\nrpm = 5000\n'
                    '[engine.model_limits."gpt-4.1"]\ntpm = 300000\n[engine.prices."gpt-4.1-mini"]\ninput = 0.4\n')
    cfg = load_engine_config(path, concurrency=None, timeout=30.0)
    assert cfg.concurrency == 64 and cfg.timeout == 30.0  # None = not given; a given flag wins
    assert cfg.limits.rpm == 5000 and cfg.model_limits["gpt-4.1"].tpm == 300000
    assert cfg.prices["gpt-4.1-mini"].input == 0.4


@pytest.mark.parametrize("text, words", [
    ("[engine]\nconcurency = 12\n", "unknown field `concurency`"),
    ("[engine]\nconcurrency = 'many'\n", "Expected `int`"),
    ("[engine.limits]\nrmp = 5\n", "unknown field `rmp`"),
    ("[engine\n", "not valid TOML"),
    # Tables the command reading [engine] does not use are checked too, and numbers are numbers.
    ("[engin]\nconcurrency = 5\n", "unknown field `engin`"),
    ("[explore]\nsampel = 5\n", "unknown field `sampel`"),
    ("[batch]\nmax_request = 5\n", "unknown field `max_request`"),
    ("[engine]\nconcurrency = '5'\n", "Expected `int`, got `str`"),
    ("[run]\nseed = '3'\n", "Expected `int`, got `str`"),
])
def test_bad_settings_name_the_file_and_the_problem(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_engine_config(tmp_path / "nope.toml")
