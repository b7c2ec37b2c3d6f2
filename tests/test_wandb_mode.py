"""wandb.mode=auto decides online/offline with wandb's own credential lookup (edge/wandb_mode.py), for every
login form wandb supports; under `wandb agent` a run is online; WANDB_MODE wins. Each case starts a fresh wandb
session (wandb.teardown) in an environment with no user credentials (HOME, NETRC and WANDB_CONFIG_DIR in tmp)."""

import pytest

from superweight.config import ConfigError
from superweight.edge.wandb_mode import resolve_mode

KEY = "k" * 40
HOST = "https://wandb.example.org:8443"


@pytest.fixture
def clean(tmp_path, monkeypatch):
    import os

    import wandb

    # End the session an earlier test started, and drop its service address for good: were WANDB_SERVICE
    # only unset through monkeypatch, the undo would restore the address of the service torn down below, and
    # the next test's wandb.init would try to reach a dead socket.
    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)
    for k in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)

    def mode(**env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        wandb.teardown()  # a new session reads the environment and settings files again
        return resolve_mode("auto")

    yield tmp_path, mode
    wandb.teardown()


def test_no_credentials_is_offline_and_wandb_mode_wins(clean):
    tmp, mode = clean
    assert mode() == "offline"
    assert mode(WANDB_API_KEY=KEY) == "online"
    assert mode(WANDB_MODE="offline") == "offline"  # WANDB_MODE over credentials
    assert mode(WANDB_MODE="disabled") == "disabled"
    assert resolve_mode("disabled") == "disabled" and resolve_mode("offline") == "offline"


def test_under_wandb_agent_a_run_is_online_even_without_credentials(clean):
    _, mode = clean
    assert mode(WANDB_SWEEP_ID="abc123") == "online"  # wandb.init then fails loudly if it cannot log in


def test_netrc_entry_with_port_for_a_self_hosted_server(clean):
    """`wandb login --host https://host:8443` writes `machine host:8443`; a lookup by hostname alone misses it."""
    tmp, mode = clean
    (tmp / "netrc").write_text(f"machine wandb.example.org:8443\n  login user\n  password {KEY}\n")
    assert mode() == "offline"  # the entry is not for api.wandb.ai
    assert mode(WANDB_BASE_URL=HOST) == "online"
    assert mode(WANDB_BASE_URL="https://wandb.example.org") == "offline"  # another port: no credentials


def test_server_from_wandbs_settings_file(clean):
    """`wandb login --host` also writes base_url to wandb's settings file; WANDB_BASE_URL is then unset."""
    tmp, mode = clean
    (tmp / "netrc").write_text(f"machine wandb.example.org:8443\n  login user\n  password {KEY}\n")
    (tmp / "config").mkdir()
    (tmp / "config" / "settings").write_text(f"[default]\nbase_url = {HOST}\n")
    assert mode() == "online"


def test_identity_token_file_login(clean):
    tmp, mode = clean
    (tmp / "token.jwt").write_text("header.payload.signature")
    assert mode(WANDB_IDENTITY_TOKEN_FILE=str(tmp / "token.jwt")) == "online"


def test_malformed_key_is_one_clear_error(clean):
    _, mode = clean
    with pytest.raises(ConfigError, match="not valid: .*40"):
        mode(WANDB_API_KEY="short")


def _main(capsys, *argv) -> tuple[int, list[str]]:
    import wandb

    from superweight.commands import main

    wandb.teardown()  # a new session reads the environment
    rc = main(list(argv))
    return rc, capsys.readouterr().err.splitlines()


def test_run_with_a_malformed_key_is_one_line_and_exit_2(clean, monkeypatch, capsys):
    """`WANDB_API_KEY=short superweight run`: one line naming the bad credential, exit 2, nothing written."""
    tmp, _ = clean
    monkeypatch.setenv("WANDB_API_KEY", "short")
    rc, err = _main(capsys, "run", f"out_dir={tmp / 'out'}")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("superweight: error: W&B credentials for https://") and " are not valid: " in err[0]
    assert "WANDB_API_KEY" in err[0] and "40" in err[0] and "short" not in err[0]  # names it, never prints it
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("key", [None, "short"])
def test_figures_from_wandb_without_usable_credentials_is_one_line_and_exit_2(clean, monkeypatch, capsys, key):
    tmp, _ = clean
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    rc, err = _main(capsys, "figures", "wandb:ent/proj", "--out", str(tmp / "figs"))
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("superweight: error: wandb:ent/proj needs W&B credentials: ")
    assert ("No API key configured" if key is None else "WANDB_API_KEY invalid") in err[0]
    assert not (tmp / "figs").exists()


def test_figures_sweep_with_local_sources_only_is_refused(clean, capsys):
    """--sweep ID filters W&B runs: with local sources only it would be ignored, so it is an error."""
    tmp, _ = clean
    (tmp / "run").mkdir()
    rc, err = _main(capsys, "figures", str(tmp / "run"), "--sweep", "abc123", "--out", str(tmp / "figs"))
    assert rc == 2 and len(err) == 1, err
    assert "--sweep 'abc123' selects W&B runs, but no source is wandb:ENTITY/PROJECT" in err[0]
    assert not (tmp / "figs").exists()
