"""Online, offline or disabled: decided by wandb's own credential lookup, never by a second copy of it.

`wandb.mode=auto` is
  * WANDB_MODE when set (`offline`/`dryrun`, `disabled`, `online`/`run`);
  * online under `wandb agent` (WANDB_SWEEP_ID set): a sweep run that cannot reach W&B must fail, not
    become an offline run the sweep never hears from;
  * otherwise online when wandb itself finds credentials for its server, offline when it finds none.
    The lookup is wandb's (`wandb.sdk.lib.wbauth.authenticate.authenticate_session` with `prompt=False`,
    for `wandb.setup().settings.base_url`): WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, the netrc entry for
    the server's host *with its port* (what `wandb login --host https://host:8443` writes; NETRC moves the
    file), the `base_url` of wandb's settings file (`wandb login --host` writes it to
    `$WANDB_CONFIG_DIR/settings`) or WANDB_BASE_URL.
An online run that cannot reach W&B (wrong host, no network, a refused key) fails in `wandb.init`: the
command prints one line and exits non-zero (tracking.TrackingError); it never falls back to offline.
"""

from __future__ import annotations

import os

from ..config import ConfigError

MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials() -> str | None:
    """The server URL wandb has credentials for (its own lookup, module docstring), or None.
    Raises ConfigError (one line, exit 2, before anything is written) with wandb's message when credentials
    exist but are malformed (e.g. WANDB_API_KEY shorter than 40 characters)."""
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib.wbauth import authenticate

    host = wandb_setup.singleton().settings.base_url
    try:
        auth = authenticate.authenticate_session(host=host, source="superweight", prompt=False,
                                                 update_session=False)
    except AuthenticationError as e:
        raise ConfigError(f"W&B credentials for {host} are not valid: {' '.join(str(e).split())}; fix them "
                          "(`wandb login --relogin`) or set wandb.mode=offline / wandb.mode=disabled") from None
    return str(auth.host) if auth is not None else None


def resolve_mode(mode: str, env=None) -> str:
    """The wandb.init mode for `wandb.mode=<mode>` (module docstring)."""
    env = os.environ if env is None else env
    if mode != "auto":
        return mode
    wm = (env.get("WANDB_MODE") or "").strip().lower()
    if wm in ("offline", "dryrun"):
        return "offline"
    if wm == "disabled":
        return "disabled"
    if wm in ("online", "run") or env.get("WANDB_SWEEP_ID"):
        return "online"
    return "online" if wandb_credentials() else "offline"
