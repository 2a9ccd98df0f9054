import pytest
import yaml

from bitlm import ConfigError, ExperimentConfig, ModelConfig, load_config
from bitlm.config import apply_overrides, dump_config, flatten, from_dict, to_dict


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["model.d_model=256", "train.lr=0.002", "data.inputs=[a.txt]"])
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="'d_modle'.*valid keys: d_model"):
        from_dict(ExperimentConfig, {"model": {"d_modle": 64}})
    with pytest.raises(ConfigError, match="'optimiser'"):
        from_dict(ExperimentConfig, {"optimiser": {}})
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        apply_overrides(ExperimentConfig(), ["train.nope=1"])


def test_types_are_checked():
    with pytest.raises(ConfigError, match="model.d_model must be an integer"):
        from_dict(ExperimentConfig, {"model": {"d_model": "big"}})
    with pytest.raises(ConfigError, match="true/false"):
        from_dict(ExperimentConfig, {"model": {"reversible": "yes"}})
    with pytest.raises(ConfigError, match="integer"):
        from_dict(ExperimentConfig, {"model": {"num_layers": True}})
    cfg = from_dict(ExperimentConfig, {"train": {"lr": 1}})  # ints are fine for floats
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_values_are_validated():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=30, nhead=4)
    with pytest.raises(ConfigError, match="arch"):
        from_dict(ModelConfig, {"arch": "token"})


def test_overrides_parse_yaml_values_and_flatten():
    cfg = apply_overrides(ExperimentConfig(), ["model.chunk_size=null", "train.max_steps=5", "model.reversible=true"])
    assert cfg.model.chunk_size is None and cfg.train.max_steps == 5 and cfg.model.reversible
    flat = flatten(cfg)
    assert flat["model.d_model"] == cfg.model.d_model and "train.lr" in flat
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["model.d_model"])


def test_shipped_configs_load():
    from pathlib import Path

    paths = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    assert paths, "configs/ holds the experiment configs"
    for path in paths:
        cfg = load_config(path)
        assert yaml.safe_load(dump_config(cfg))["model"]["d_model"] == cfg.model.d_model


def test_bad_yaml_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "pipeline"])
def test_gpu_runs_take_every_strategy_and_refuse_what_the_strategy_cannot_honour(strategy):
    on_gpu = ["run.use_gpu=true", "train.amp=true", "train.fused_adamw=true", f"run.strategy={strategy}"]
    cfg = apply_overrides(ExperimentConfig(), on_gpu)
    assert cfg.train.fused_adamw and cfg.run.use_gpu
    cfg.check_platform()  # collectives, batches and checkpoints follow the worker's device
    compiled = apply_overrides(cfg, ["train.compile_model=true"])
    if strategy == "pipeline":
        with pytest.raises(ConfigError, match="train.compile_model is not supported with run.strategy=pipeline"):
            compiled.check_platform()
    else:
        compiled.check_platform()


def test_a_sweep_space_names_its_sampler_types():
    from bitlm.sweep_config import SweepConfig

    with pytest.raises(ConfigError, match="choice, grid, uniform, loguniform or randint"):
        SweepConfig(space={"train.lr": {"type": "normal"}})


def test_ngram_embeddings_are_checked_when_loaded():
    for bad, message in (
        (["model.ngram_sizes=[1]"], "distinct sizes from 2 to 8"),
        (["model.ngram_sizes=[3, 3]"], "distinct sizes"),
        (["model.ngram_sizes=[2]", "model.arch=bit"], "needs arch=byte_patch"),
        (["model.ngram_vocab=0"], "ngram_vocab must be >= 1"),
        (["model.ngram_dropout=1.0"], "ngram_dropout must be in"),
        (["model.ngram_dropout=0.3", "model.ngram_sizes=[]"], "ngram_dropout needs n-grams"),
        (["model.patch_bytes=4", "model.arch=bit"], "patch_bytes needs arch=byte_patch"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.arch=byte_patch", *bad])


def test_settings_left_to_the_architecture_follow_it():
    """dropout and ngram_sizes left unset (None) take the architecture's defaults when the
    model is built, so an override of model.arch brings that architecture's own."""
    from bitlm import BitTransformerLM
    from bitlm.config import ARCH_DEFAULTS

    cfg = load_config(None, ["model.arch=byte_patch"])
    assert cfg.model.dropout is None and cfg.model.ngram_sizes is None
    assert cfg.model.resolved().ngram_sizes == [2, 3, 4] and cfg.model.resolved().dropout == 0.0
    bit = apply_overrides(cfg, ["model.arch=bit"]).model.resolved()
    assert bit.ngram_sizes == [] and bit.dropout == ARCH_DEFAULTS["bit"]["dropout"] == 0.1  # the guide's
    model = BitTransformerLM(d_model=32, nhead=4, num_layers=1, dim_feedforward=64, max_seq_len=90, arch="byte_patch")
    assert model.config.dropout == 0.0 and hasattr(model.io, "ngram_emb")
    assert BitTransformerLM(config=ModelConfig(arch="byte_patch", dropout=0.2, ngram_sizes=[])).config.dropout == 0.2
    assert model.config.ngram_dropout == ARCH_DEFAULTS["byte_patch"]["ngram_dropout"] == 0.5
    assert bit.ngram_dropout == 0.0  # no n-grams, nothing to drop
    assert (model.config.patch_bytes, bit.patch_bytes) == (ARCH_DEFAULTS["byte_patch"]["patch_bytes"], 1)
    assert ModelConfig(arch="byte_patch", ngram_sizes=[]).resolved().ngram_dropout == 0.0


def test_a_shard_of_no_rows_is_refused_by_name():
    from bitlm.config import DataConfig

    with pytest.raises(ConfigError, match="data.shard_rows must be >= 1, got 0"):
        DataConfig(shard_rows=0)


def test_an_unknown_growth_strategy_is_refused_by_name_in_a_config_and_in_a_sweep():
    from bitlm.config import TrainConfig
    from bitlm.sweep_config import SchedulerConfig

    with pytest.raises(ConfigError, match="train.scale_strategies: unknown strategy 'wide'"):
        TrainConfig(scale_strategies=["depth", "wide"])
    with pytest.raises(ConfigError, match="sweep.scheduler.strategies: unknown strategy 'tall'"):
        SchedulerConfig(type="scaling", strategies=["tall"])
    assert TrainConfig(scale_strategies=["depth", "width", "context"]).scale_strategies == ["depth", "width", "context"]
