"""megaseek: DeepSeek-style LLM training on DeepSpeed with hand-written tensor and pipeline parallelism."""


def _register_config_schemas() -> None:
    # conf/<group>/*.yaml extend `<group>/schema` (megaseek/config/sections.py): Hydra must know them before
    # any composition, whoever composes (launch scripts, tests, the planner).
    try:
        from megaseek.config.sections import register
    except ImportError:  # hydra not installed: nothing composes
        return
    register()


_register_config_schemas()
