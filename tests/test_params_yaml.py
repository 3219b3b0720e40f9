"""Issue 22, rows 8 and 9: how params.yaml is read.

Row 8: YAML anchors and aliases are refused anywhere in the file (a billion-laughs document in a `list[Any]`
field loaded, then blew up serialising the train params and `dvc status`). Row 9: the file is read with YAML 1.2
semantics, as DVC reads and writes it (`dvc exp run -S` rewrites params.yaml with a YAML 1.2 writer that drops
the quotes from `'off'`): `off` is the string "off", not false.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from medclf.config import ConfigError, load_settings, settings_from_dict

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs in `train.tune.space.dropout.choices` (a `list[Any]`): width**levels strings from ~1 kB."""
    items = [f"          - &l0 [{', '.join(['lol'] * width)}]"]
    items += [f"          - &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "train:\n  tune:\n    space:\n      dropout:\n        choices:\n" + "\n".join(items) + "\n"


def test_alias_bomb_is_refused_fast_with_bounded_memory(tmp_path: Path) -> None:
    """Row 8: 9**9 = 387 million strings written in 1 kB. Loaded in a child process capped at 1 GiB of address
    space and 60 s: it must be a ConfigError naming the key and the line, not a load, a hang or a MemoryError."""
    params = tmp_path / "params.yaml"
    params.write_text(_bomb())
    assert len(params.read_bytes()) < 2000
    child = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from medclf.config import ConfigError, load_settings
        try:
            s = load_settings({str(params)!r})
        except ConfigError as err:
            print(err)
            sys.exit(2)
        s.model_dump_json()  # what the train stage does with its params (it hung here, 3 GB)
        print("loaded")
    """)
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "-c", child],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading a 1 kB alias bomb did not finish in 60 s")
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert time.monotonic() - t0 < 30
    msg = out.stdout.strip()
    assert msg.startswith(f"{params}: line 7: train.tune.space.dropout.choices[1]"), msg
    assert "alias" in msg and "*l0" in msg, msg


@pytest.mark.parametrize(
    ("text", "where"),
    [
        # an alias to a scalar: harmless in size, but refused the same way everywhere (one rule, no exceptions)
        ("train:\n  head_epochs: &n 3\n  finetune_epochs: *n\n", "line 3: train.finetune_epochs"),
        # a merge key pulling a whole section in
        ("evaluate:\n  gates: &g {min_f1: 0.5}\n  other: {<<: *g}\n", "line 3: evaluate.other"),
        # an alias used as a mapping key
        ("validate:\n  severity:\n    x: &k blank\n    *k : warn\n", "line 4: validate.severity"),
    ],
)
def test_aliases_are_refused_everywhere_naming_the_line_and_key(tmp_path: Path, text: str, where: str) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="YAML anchors and aliases are not allowed") as info:
        load_settings(p)
    assert str(info.value).startswith(f"{p}: {where}"), str(info.value)


def test_an_anchor_alone_is_refused_too(tmp_path: Path) -> None:
    """An anchor nothing refers to yet is the first half of a bomb: refused at its own line."""
    p = tmp_path / "params.yaml"
    p.write_text("ingest:\n  image_size: 64\ntrain:\n  head_epochs: &n 3\n")
    with pytest.raises(ConfigError, match=r"line 4: train\.head_epochs: .*anchor '&n'"):
        load_settings(p)


def test_unquoted_off_is_the_severity_off(tmp_path: Path) -> None:
    """Row 9: `{blank: off}` (the shape of params.yaml's own comment) is the severity 'off', as in YAML 1.2."""
    p = tmp_path / "params.yaml"
    p.write_text("validate:\n  severity: {blank: off, near_duplicate_within_split: off, inverted: warn}\n")
    s = load_settings(p)
    assert s.validation.severity == {"blank": "off", "near_duplicate_within_split": "off", "inverted": "warn"}


def test_yaml_1_2_scalars(tmp_path: Path) -> None:
    """YAML 1.2: `1e-4` is a float (a string in 1.1), `no`/`on` are strings, `true`/`false` are the booleans."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  finetune_lr: 1e-4\n  class_weights: false\n")
    s = load_settings(p)
    assert s.train.finetune_lr == pytest.approx(1e-4) and s.train.class_weights is False


def test_duplicate_keys_are_an_error_naming_the_line(tmp_path: Path) -> None:
    """The YAML 1.1 reader kept the last of two equal keys silently; the 1.2 reader (as DVC's) refuses them."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  head_epochs: 3\n  head_epochs: 4\n")
    with pytest.raises(ConfigError, match=rf"^{p}: not valid YAML: .*line 3.*head_epochs"):
        load_settings(p)


def test_repository_params_read_the_same_under_yaml_1_2() -> None:
    """The switch to YAML 1.2 changes nothing in the repository's own params.yaml: the same settings as 1.1 gave."""
    text = (ROOT / "params.yaml").read_text()
    assert load_settings(ROOT / "params.yaml") == settings_from_dict(yaml.safe_load(text), "params.yaml")


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "medclf test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "medclf test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        },
    )


def test_dvc_exp_run_set_param_on_a_file_with_an_off_severity(tmp_path: Path) -> None:
    """Row 9, for real: `dvc exp run -S` rewrites params.yaml (dropping the quotes of `'off'`), then a stage that
    parses it through medclf's loader runs in the experiment. It exited 2 (`Input should be 'error', 'warn' or
    'off'`) because `off` read as false."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(
        "validate:\n  severity: {blank: 'off'}   # the quoted spelling the YAML 1.1 reader needed\n"
        "train:\n  head_epochs: 3\n"
    )
    check = (
        "from medclf.config import load_settings; s = load_settings('params.yaml'); "
        "open('loaded.txt', 'w').write(f'{s.validation.severity} {s.train.head_epochs}')"
    )
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "check": {
                        "cmd": f'"{sys.executable}" -c "{check}"',
                        "params": ["validate.severity", "train.head_epochs"],
                        "outs": [{"loaded.txt": {"cache": False}}],
                    }
                }
            }
        )
    )
    for cmd in (
        ("git", "init", "-q", "-b", "main"),
        ("dvc", "init", "-q"),
        ("git", "add", "-A"),
        ("git", "commit", "-qm", "params with an off severity"),
    ):
        out = _run(repo, *cmd)
        assert out.returncode == 0, (cmd, out.stdout, out.stderr)
    out = _run(repo, "dvc", "exp", "run", "-S", "train.head_epochs=4")
    rewritten = (repo / "params.yaml").read_text()
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:], rewritten)
    assert "head_epochs: 4" in rewritten
    assert (repo / "loaded.txt").read_text() == "{'blank': 'off'} 4"
    # the stage's record in dvc.lock holds the same value medclf read
    # (DVC writes it in YAML 1.2 too: `blank: off`, unquoted, which a YAML 1.1 reader would take for false)
    from ruamel.yaml import YAML

    lock = YAML(typ="safe", pure=True).load((repo / "dvc.lock").read_text())
    assert "blank: off" in (repo / "dvc.lock").read_text() and "blank: off" in rewritten
    assert lock["stages"]["check"]["params"]["params.yaml"]["validate.severity"] == {"blank": "off"}
