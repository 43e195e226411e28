"""The CLI's face: --help readable at 80 columns, renamed flags and their aliases, the typed objects
handed to the command bodies, user errors as one line, and no torch import for --help/--version."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import twotower_cli
from twotower_cli import errors
from twotower_cli.cli import app
from twotower_cli.commands import user_errors
from twotower_cli.config import ConfigError, DecodeParams

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
COMMANDS = ["gen", "bench", "stats", "info"]


def help_text(*args: str, width: int = 80) -> str:
    r = runner.invoke(app, [*args, "--help"], terminal_width=width, env={"COLUMNS": str(width)})
    assert r.exit_code == 0, r.output
    return r.stdout


def option_names(name: str) -> list[str]:
    group = get_command(app)
    cmd = group.get_command(None, name) if name else group  # type: ignore[arg-type]
    return [o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)]


# ---- --help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_fits_80_columns_with_every_option_name_whole(name):
    text = help_text(*([name] if name else []))
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, "\n".join(too_wide)
    assert "…" not in text  # nothing cut short
    words = {w.strip(",[]()") for line in text.splitlines() for w in line.replace("/", " ").split()}
    for opt in option_names(name):
        assert opt in words, f"{opt} is not shown whole in `twotower {name} --help`:\n{text}"
    assert f"Usage: twotower {name}".rstrip() + " " in text


def test_help_groups_options_in_panels_and_shows_switch_pairs():
    text = help_text("gen")
    for panel in ("Decoding", "Model & devices", "Input/Output", "Scale-out"):
        assert f"─ {panel} ─" in text
    for pair in ("--overwrite/--no-overwrite", "--fail-on-error/--no-fail-on-error", "-q, --quiet/--no-quiet",
                 "--block-size, --block", "--steps-per-block, --steps"):
        assert pair in text
    assert "[default: 0.8]" in help_text("gen")  # defaults shown
    bench = help_text("bench")
    assert "--block-size, --block" in bench and "--steps-per-block, --steps" in bench


def test_help_texts_are_sentences():
    group = get_command(app)
    for cmd in (group, *(group.get_command(None, n) for n in COMMANDS)):  # type: ignore[arg-type]
        for text in (cmd.help, *(p.help for p in cmd.params)):
            text = (text or "").strip()
            assert text[:1].isupper() and text.endswith("."), (cmd.name, text)


def test_shared_options_are_declared_once():
    """--model, --block-size, --steps-per-block, --max-new-tokens, --threads: the same declaration
    (names, help, panel) in gen and bench; only the defaults may differ."""
    group = get_command(app)
    gen, bench = (group.get_command(None, n) for n in ("gen", "bench"))  # type: ignore[arg-type]
    for name in ("model", "block_size", "steps_per_block", "max_new_tokens", "threads"):
        g = next(p for p in gen.params if p.name == name)
        b = next(p for p in bench.params if p.name == name)
        assert (g.opts, g.help, g.rich_help_panel, g.metavar) == (b.opts, b.help, b.rich_help_panel, b.metavar)


# ---- renamed flags and the objects the command bodies get ------------------------------------------


@pytest.fixture
def captured_gen(monkeypatch):
    from twotower_cli.commands import gen as cmd

    seen = []

    def fake(run, decode, placement, scale):
        seen.append((run, decode, placement, scale))
        return 0

    monkeypatch.setattr(cmd, "run_gen", fake)
    return seen


def test_renamed_flags_and_their_aliases_give_the_same_run(captured_gen, tmp_path):
    base = ["gen", "p.jsonl", "-o", str(tmp_path / "out"), "--gamma", "0.6"]
    for extra in (["--block", "4", "--steps", "2"], ["--block-size", "4", "--steps-per-block", "2"]):
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == 0, r.output
    (run1, d1, p1, s1), (run2, d2, p2, s2) = captured_gen
    assert d1 == d2 == DecodeParams(gamma=0.6, block_size=4, steps_per_block=2)
    assert (run1, p1, s1) == (run2, p2, s2)
    # The run fingerprint is built from DecodeParams' field names: they must not change.
    assert [f.name for f in dataclasses.fields(DecodeParams)] == [
        "mode", "gamma", "block_size", "steps_per_block", "temperature", "max_new_tokens", "seed", "mask_token_id",
        "top_k", "top_p", "min_p", "stop", "n"]


def test_gen_flags_reach_typed_objects(captured_gen, tmp_path):
    r = runner.invoke(app, ["gen", "-", "-o", str(tmp_path / "o"), "--model", str(tmp_path), "--mode", "ar",
                            "--temperature", "0.5", "--max-new-tokens", "7", "--seed", "3", "--mask-token-id", "5",
                            "--device", "cpu", "--dtype", "float32", "--threads", "2", "--max-batch-rows", "4",
                            "--max-batch-tokens", "99", "--rows-per-shard", "9", "--prompt-field", "t",
                            "--id-field", "k", "--limit", "5", "--overwrite", "--fail-on-error", "-q",
                            "--num-shards", "2", "--shard-index", "1", "--ray-address", "auto", "--ray-actors", "3",
                            "--ray-cpus", "2", "--ray-batch-rows", "8"])
    assert r.exit_code == 0, r.output
    [(run, decode, placement, scale)] = captured_gen
    assert decode == DecodeParams(mode="ar", temperature=0.5, max_new_tokens=7, seed=3, mask_token_id=5)
    assert (run.source, run.out, run.max_batch_rows, run.max_batch_tokens, run.rows_per_shard) == (
        "-", tmp_path / "o", 4, 99, 9)
    assert (run.prompt_field, run.id_field, run.limit, run.overwrite, run.fail_on_error, run.quiet) == (
        "t", "k", 5, True, True, True)
    assert (placement.model, placement.device, placement.ctx_device, placement.den_device) == (
        tmp_path, "cpu", None, None)
    assert (placement.dtype, placement.threads) == ("float32", 2)
    assert (scale.num_shards, scale.shard_index, scale.ray, scale.ray_address) == (2, 1, False, "auto")
    assert (scale.ray_actors, scale.ray_cpus, scale.ray_batch_rows, scale.use_ray) == (3, 2.0, 8, True)


@pytest.mark.parametrize("args, word", [
    (["--gamma", "1.5"], "gamma"),
    (["--block-size", "0"], "block_size"),
    (["--steps-per-block", "0"], "steps_per_block"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--mode", "nope"], "mode"),
    (["--seed", "-1"], "seed"),
])
def test_decoding_ranges_are_checked_by_decode_params(captured_gen, tmp_path, args, word):
    """Out-of-range decoding flags stop before anything is loaded, with DecodeParams' own message."""
    r = runner.invoke(app, ["gen", "p.jsonl", "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and not captured_gen
    assert r.stderr.startswith("error: ") and word in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, word", [
    (["--gammas", "0.5,abc"], "comma-separated"),
    (["--gammas", "0.5,1.5"], "gamma must be in [0, 1]"),
    (["--gammas", ","], "--gammas"),
    (["--block-size", "0"], "block_size"),
    (["--steps", "0"], "steps_per_block"),
])
def test_bench_bad_flags_exit_2_before_loading(monkeypatch, args, word):
    from twotower_cli.commands import bench as cmd

    monkeypatch.setattr(cmd, "run", lambda *a, **k: pytest.fail("bench ran with bad flags"))
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == 2 and word in r.stderr, r.output


# ---- errors ------------------------------------------------------------------------------------------


def test_config_error_is_a_user_error_and_a_value_error():
    assert issubclass(ConfigError, errors.UserError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError):
        DecodeParams(gamma=2.0)


def test_user_errors_reports_any_user_error_as_one_line(capsys):
    import typer

    class Custom(errors.UserError):
        pass

    for exc in (Custom("bad\n  input"), ConfigError("bad config"), errors.UserError("plain")):
        with pytest.raises(typer.Exit) as e, user_errors():
            raise exc
        assert e.value.exit_code == errors.EXIT_USAGE
        assert capsys.readouterr().err == f"error: {errors.one_line(exc)}\n"
    with pytest.raises(KeyError), user_errors():  # a bug keeps its traceback
        raise KeyError("x")


def test_commands_user_error_alias():
    from twotower_cli import commands

    assert commands.UserError is errors.UserError


# ---- the package's lazy API ----------------------------------------------------------------------------


def test_public_api_resolves_lazily():
    assert "__version__" in twotower_cli.__all__ and isinstance(twotower_cli.__version__, str)
    for name in twotower_cli.__all__:
        assert getattr(twotower_cli, name) is not None, name
        assert name in dir(twotower_cli)
    from twotower_cli.config import DecodeParams as D
    from twotower_cli.model.checkpoint import save_pretrained

    assert twotower_cli.DecodeParams is D and twotower_cli.save_pretrained is save_pretrained
    with pytest.raises(AttributeError):
        twotower_cli.no_such_name  # noqa: B018


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--help"], ["gen", "--help"], ["bench", "--help"], ["stats", "--help"],
                                  ["info", "--help"], ["--version"]])
def test_help_and_version_do_not_import_torch(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "twotower_cli", *args], capture_output=True,
                       env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    imported = [line.rsplit("|", 1)[-1].strip() for line in p.stderr.decode().splitlines()
                if line.startswith("import time:")]
    assert "twotower_cli.cli" in imported
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "numpy", "pyarrow", "transformers", "tokenizers")]
    assert not heavy, f"`twotower {' '.join(args)}` imported {heavy[:5]}"
    assert p.stdout.strip()


@pytest.mark.slow
def test_import_package_does_not_import_torch():
    code = ("import sys, twotower_cli; from twotower_cli import DecodeParams, ConfigError; "
            "import twotower_cli.commands, twotower_cli.commands.gen, twotower_cli.commands.bench, "
            "twotower_cli.commands.info, twotower_cli.commands.stats, twotower_cli.options; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
