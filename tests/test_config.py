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
    ("[engine]\nconcurency = 12\n", "[engine] concurency: unknown key"),
    ("[engine]\nconcurrency = 'many'\n", "[engine] concurrency: expected an integer, got a string"),
    ("[engine.limits]\nrmp = 5\n", "[engine] limits.rmp: unknown key"),
    ("[engine\n", "not valid TOML"),
    # Tables the command reading [engine] does not use are checked too, and numbers are numbers.
    ("[engin]\nconcurrency = 5\n", "unknown table [engin]"),
    ("[explore]\nsampel = 5\n", "[explore] sampel: unknown key"),
    ("[batch]\nmax_request = 5\n", "[batch] max_request: unknown key"),
    ("[engine]\nconcurrency = '5'\n", "[engine] concurrency: expected an integer, got a string"),
    ("[engine]\nconcurrency = 1.5\n", "[engine] concurrency: expected an integer, got a decimal number"),
    ("[run]\nseed = '3'\n", "[run] seed: expected an integer, got a string"),
    ("[engine]\nlimits = 5\n", "[engine] limits: expected a table, got an integer"),
    ("[engine.limits]\nrpm = 'x'\n", "[engine] limits.rpm: expected a number, got a string"),
    ("[respond]\ngenerators = ['a', 2]\n", "[respond] generators[1]: expected a string, got an integer"),
    ("[respond]\ngenerators = 'a'\n", "[respond] generators: expected an array, got a string"),
    # A key msgspec leaves out ("$.prices[...]") is named, quoted where TOML needs it.
    ('[engine.prices."gpt-4.1-mini"]\ninput = "x"\n',
     '[engine.prices."gpt-4.1-mini"] input: expected a number, got a string'),
    ('[engine.prices.a]\ninput = 1\n[engine.prices.b]\noutput = "x"\n',
     "[engine] prices.b.output: expected a number, got a string"),
    ('[engine.model_limits."a.b"]\nrpx = 1\n', '[engine.model_limits."a.b"] rpx: unknown key'),
    ("[batch.model_enqueued_tokens]\nm = 'x'\n", "[batch] model_enqueued_tokens.m: expected an integer, got a string"),
])
def test_bad_settings_name_the_file_and_the_problem(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_engine_config(path)
    assert str(info.value) == f"{path}: {words}" or words == "not valid TOML" and words in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_engine_config(tmp_path / "nope.toml")


def _run_args(tmp_path, config, **flags):
    import argparse

    from tcia_async.flows import run

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    argv = ["seeds.jsonl", "--out", str(tmp_path / "out")] + (["--config", str(config)] if config else [])
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    return parser.parse_args(argv)


def test_a_command_parses_its_settings_file_once(tmp_path, monkeypatch):
    from tcia_async import config
    from tcia_async.flows.run import build_configs

    path = tmp_path / "run.toml"
    path.write_text("[run]\nseed = 3\n[engine]\nconcurrency = 7\n[batch]\npoll_interval = 2.0\npoll_max = 4.0\n")
    reads = []
    real = config.load_toml
    monkeypatch.setattr(config, "load_toml", lambda p: reads.append(p) or real(p))
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # once read the file again to look for base_url
    run_cfg, eng_cfg, batch = build_configs(_run_args(tmp_path, path))
    assert (run_cfg.run.seed, eng_cfg.concurrency, batch.poll_interval) == (3, 7, 2.0)
    assert len(reads) == 1


def test_base_url_precedence_flag_then_file_then_environment(tmp_path, monkeypatch):
    from tcia_async.config import read_settings
    from tcia_async.flows.common import engine_config

    flags = {"base_url": "--base-url"}
    with_url = tmp_path / "url.toml"
    with_url.write_text('[engine]\nbase_url = "http://file.example/v1"\n')
    without = tmp_path / "plain.toml"
    without.write_text("[engine]\nconcurrency = 3\n")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env.example/v1")

    def url(config, **flag):
        args = _run_args(tmp_path, config, **flag)
        return engine_config(args, read_settings(args.config), flags).base_url

    assert url(with_url, base_url="http://flag.example/v1") == "http://flag.example/v1"
    assert url(with_url) == "http://file.example/v1"
    assert url(without) == url(None) == "http://env.example/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "ftp://env.example")
    with pytest.raises(ConfigError, match=r"^\$OPENAI_BASE_URL = 'ftp://env.example'"):
        url(without)


def test_a_flag_under_a_key_that_is_not_a_table_is_an_error_naming_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[engine]\nlimits = 5\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: \[engine\] limits: expected a table, got an integer"):
        load_engine_config(path, {"limits.rpm": 100.0}, {"limits.rpm": "--rpm"})


def test_overrides_do_not_change_the_file_as_read(tmp_path):
    from tcia_async.config import load_run_config, read_settings

    path = tmp_path / "run.toml"
    path.write_text("[run]\nseed = 3\n[engine.limits]\nrpm = 50\n")
    settings = read_settings(path)
    assert load_engine_config(settings, {"limits.rpm": 9.0}).limits.rpm == 9.0
    assert load_run_config(settings, {"run.seed": 8}).run.seed == 8
    assert load_engine_config(settings).limits.rpm == 50 and load_run_config(settings).run.seed == 3


@pytest.mark.parametrize("command", ["generate", "run", "db build"])
def test_every_batch_mode_names_poll_interval_and_the_batch_table(tmp_path, command, capsys):
    from tcia_async.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"instruction": "Write a haiku. Use three lines."}\n')
    head = {"generate": ["generate", str(inp), "-o", str(tmp_path / "out.jsonl")],
            "run": ["run", str(inp), "--out", str(tmp_path / "run")],
            "db build": ["db", "build", str(inp), "--out", str(tmp_path / "db")]}[command]
    base = ["--mode", "batch", "--base-url", "http://127.0.0.1:9/v1"]
    assert main([*head, *base, "--poll-interval", "0"]) == 2
    assert "--poll-interval = 0" in capsys.readouterr().err
    settings = tmp_path / "batch.toml"
    settings.write_text("[batch]\npoll_interval = 10.0\npoll_max = 5.0\n")
    assert main([*head, *base, "--config", str(settings)]) == 2
    assert f"{settings}: [batch] poll_max = 5.0: must be at least poll_interval" in capsys.readouterr().err


def test_a_mode_for_verify_which_follows_compose_is_an_error_naming_the_table(tmp_path):
    from tcia_async.config import read_settings

    path = tmp_path / "run.toml"
    path.write_text('[verify]\nmode = "batch"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: \[verify\] mode: .*follows compose's mode; set mode in "
                       r"\[compose\]"):
        read_settings(path)
    path.write_text('[verify]\nmodel = "gpt-4.1"\n[compose]\nmode = "batch"\n')
    assert read_settings(path) is not None  # its model is its own


@pytest.mark.parametrize("text, flag, value, words", [
    ("[engine]\nbase_url = 5\n", "base_url", "http://127.0.0.1:9/v1", "[engine] base_url"),
    ('[engine]\nbase_url = "ftp://x"\n', "base_url", "http://127.0.0.1:9/v1", "[engine] base_url = 'ftp://x'"),
    ('[engine]\nconcurrency = "lots"\n', "concurrency", 4, "[engine] concurrency"),
    ("[engine]\nconcurrency = 0\n", "concurrency", 4, "[engine] concurrency = 0: must be a whole number >= 1"),
    ("[engine.limits]\nrpm = -1\n", "rpm", 100.0, "[engine] limits.rpm = -1"),
    ('[batch]\npoll_interval = "soon"\n', "poll_interval", 5.0, "[batch] poll_interval"),
])
def test_a_bad_value_in_the_file_is_an_error_even_when_a_flag_overrides_it(tmp_path, text, flag, value, words):
    from tcia_async.flows.run import build_configs

    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        build_configs(_run_args(tmp_path, path, **{flag: value}))
    assert f"{path}: {words}" in str(info.value)


def test_a_flag_may_still_make_the_files_poll_max_fit(tmp_path):
    from tcia_async.flows.run import build_configs

    path = tmp_path / "c.toml"
    path.write_text("[batch]\npoll_max = 10.0\n")  # below the default poll_interval, 30
    assert build_configs(_run_args(tmp_path, path, poll_interval=5.0))[2].poll_max == 10.0
    with pytest.raises(ConfigError, match=r"\[batch\] poll_max = 10.0: must be at least poll_interval"):
        build_configs(_run_args(tmp_path, path))


def test_run_help_lists_every_table_its_config_accepts(capsys):
    from tcia_async.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(["run"]).parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    tables = ["run", "decompose", "explore", "compose", "verify", "validate", "on_task", "contexts", "respond",
              "judge", "evol", "engine", "batch"]
    assert all(f"[{t}]" in text for t in tables), text
