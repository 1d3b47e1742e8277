"""Checks a launch script runs on its command line before Hydra composes."""
from __future__ import annotations

import sys
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def refuse_unknown_overrides(argv: list[str], conf_dir: Path = CONF) -> None:
    """Exit 2 with one message when a `group.key=value` override names a key no config declares (Hydra would
    say only "Key ... is not in struct"); ours names the closest valid key."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if not overrides or not conf_dir.is_dir():
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from megaseek.config.schema import ConfigError
    from megaseek.config.sections import check_overrides, known_keys
    def is_group(key: str) -> bool:  # `model=small`, or a group path such as `hydra/launcher=submitit_slurm`
        return "/" in key or ("." not in key and (conf_dir / key).is_dir())
    hydra_own = ("hydra.", "hydra/")
    plain = [o for o in overrides if not o.startswith(("+", "~") + hydra_own) and not is_group(o.split("=", 1)[0])]
    groups = [o for o in overrides if o not in plain and not o.startswith(hydra_own)]
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[g for g in groups if "," not in g])
    except HydraException:
        return  # a bad group selection: Hydra's own message names it
    try:
        check_overrides(plain, known_keys(cfg))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
