"""Prepare a dataset: `python launch/prepare_data.py data=NAME [overrides]`.

Builds (or finds up to date) the tiers raw -> cleaned -> tokenized under `data.root`, each with a
manifest; `data.verify=true` re-hashes every tier against its manifest, `data.rebuild=[cleaned]`
rebuilds a tier and the ones after it, `data.engine=dask` runs the cleaning stage on Dask (a LocalCluster
started here, or `data.dask.address` / `data.dask.scheduler_file` of a running one). Training
(`launch/pretrain.py data=NAME`) reads the same tiers.
"""
import sys

import megaseek  # noqa: F401  (registers the config schemas the conf/ groups extend)


import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from megaseek.config.schema import ConfigError
    from megaseek.data.pipeline import prepare
    from megaseek.data.spec import DataSpec
    try:
        spec = DataSpec.from_config(cfg.data, vocab_size=int(cfg.model.vocab_size))
        prepare(spec, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
