"""The config is checked once, completely, with one home for defaults (slidemil.config).

Typos fail `snakemake -n` with one line naming the key; the DAG needs no torch for that, so the model and
extractor names it checks against are declared in slidemil.names, which must equal the real registries.
"""

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest
import yaml

from factories import ROOT, TINY_SHEET_CONFIG, snakemake_cli
from slidemil import config as cfg
from slidemil import names


def dry_run(tmp_path, config: dict, *args):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    return snakemake_cli(tmp_path, "-n", "--cores", "1", *args, configfile="cfg.yaml", timeout=300)


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("config:")]


TYPOS = [
    ({"mil": {"models": ["abmill"]}}, "config: mil.models: unknown model 'abmill'; allowed: abmil, abmil_gated,"),
    ({"mil": {"settings": {"abmil": {"dropuot": 0.1}}}},
     "config: mil.settings.abmil.dropuot: unknown setting; allowed: attn_dim, dropout, embed_dim"),
    ({"mil": {"training": {"epoch": 3}}}, "config: mil.training.epoch: unknown training setting; allowed: epochs,"),
    ({"features": {"extractors": ["resnet50"]}}, "config: features.extractors: unknown extractor 'resnet50'"),
    ({"features": {"settings": {"resnet18": {"weights": "random", "input_px": 8, "dtype": "float32"}},
                   "extractors": ["resnet18"]}}, "config: features.settings.resnet18.input_px must be an integer"),
    ({"results": ""}, "config: results: '' would plan every output at the filesystem root"),
    ({"results": "/"}, "config: results: '/' would plan every output at the filesystem root"),
    ({"seed": -1}, "config: seed must be an integer at least 0, got -1"),
    # model-setting values, not only their names, fail before any job (the train job would fail the same way)
    ({"mil": {"settings": {"abmil": {"dropout": 1.5}}}},
     "config: mil.settings.abmil.dropout must be a number at least 0 and below 1, got 1.5"),
    ({"mil": {"settings": {"transmil": {"embed_dim": 500}}}},
     "config: mil.settings.transmil.embed_dim must be divisible by n_heads 8, got 500"),
]


@pytest.mark.parametrize("config,line", TYPOS, ids=[t[1].split(":")[1].strip() for t in TYPOS])
def test_a_typo_fails_the_dry_run_with_one_line_naming_the_key(tmp_path, config, line):
    proc = dry_run(tmp_path, config)
    assert proc.returncode != 0
    assert [e[:len(line)] for e in error_lines(proc)] == [line], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_numbers_in_nested_config_overrides(tmp_path):
    # Snakemake reads nested --config values with YAML's BaseLoader: folds arrives as the string "3".
    proc = dry_run(tmp_path, {"mil": {"models": ["abmil"]}}, "--config", "splits={folds: 3, test_column: null}",
                   "mil={training: {epochs: 2, class_weighted: false}}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"fold={k}" in proc.stdout for k in range(3)) and "fold=3" not in proc.stdout
    proc = dry_run(tmp_path, {}, "--config", "splits={folds: two}")
    assert error_lines(proc) == ["config: splits.folds must be an integer at least 2, got 'two'"]


def test_coercion_of_strings():
    got = cfg.check_config({"splits": {"folds": "3", "test_fraction": "0.2", "test_column": "null"},
                            "mil": {"training": {"max_tiles": "null", "standardize": "false"}}})
    assert (got["splits"]["folds"], got["splits"]["test_fraction"], got["splits"]["test_column"]) == (3, 0.2, None)
    assert got["mil"]["training"]["max_tiles"] is None and got["mil"]["training"]["standardize"] is False
    # a string setting keeps its string; an integer stays an integer where a number is allowed (params repr)
    assert cfg.check_config({"splits": {"positive_class": "1"}})["splits"]["positive_class"] == "1"
    assert repr(cfg.check_config({"tiling": {"sobel_threshold": 20}})["tiling"]["sobel_threshold"]) == "20"
    # a word where a number or null is allowed is refused, not read as null
    with pytest.raises(cfg.ConfigError, match="max_tiles must be an integer at least 1 or null, got 'lots'"):
        cfg.check_config({"mil": {"training": {"max_tiles": "lots"}}})
    assert cfg.check_config({"mil": {"settings": {"varmil": {"gated": "true", "embed_dim": "null"}}}})[
        "mil"]["settings"]["varmil"]["gated"] is True


BAD_MODEL_SETTINGS = [
    ("abmil", {"n_layers": 11}, "abmil.n_layers must be at most 10 with embed_dim 512 (each layer halves the width)"),
    ("meanpool", {"embed_dim": 4, "n_layers": 4}, "meanpool.n_layers must be at most 3 with embed_dim 4"),
    ("abmil_gated", {"embed_dim": None}, "abmil_gated.embed_dim must be an integer at least 1, got None"),
    ("abmil", {"attn_dim": 0}, "abmil.attn_dim must be an integer at least 1, got 0"),
    ("varmil", {"n_layers": 2}, "varmil.n_layers must be 1 without a projection (embed_dim: null), got 2"),
    ("varmil", {"variance_n": "all"}, "varmil.variance_n must be one of real, nonzero, got 'all'"),
    ("varmil", {"gated": "yes"}, "varmil.gated must be true or false, got 'yes'"),
    ("transmil", {"embed_dim": 96, "n_heads": 5}, "transmil.embed_dim must be divisible by n_heads 5, got 96"),
    ("transmil", {"attn_dropout": -0.1}, "transmil.attn_dropout must be a number at least 0 and below 1"),
    ("mhim_abmil", {"preset": "c17"}, "mhim_abmil.preset must be one of camelyon16, tcga, null, got 'c17'"),
    ("mhim_abmil", {"mask_ratio_r": 1.0}, "mhim_abmil.mask_ratio_r must be a number at least 0 and below 1"),
    ("mhim_abmil", {"mask_ratio_hr": 0}, "mhim_abmil.mask_ratio_hr must be a number above 0 and at most 1"),
    ("mhim_transmil", {"mask_attention": "median"}, "mhim_transmil.mask_attention must be one of vote, mean, split"),
    ("mhim_transmil", {"momentum": 1.5}, "mhim_transmil.momentum must be a number at least 0 and at most 1"),
    ("mhim_abmil", {"temp_t": 0}, "mhim_abmil.temp_t must be a number above 0"),
    ("mhim_abmil", {"init_student": "teacher"}, "mhim_abmil.init_student must be one of projection, full, none"),
]


@pytest.mark.parametrize("model,settings,line", BAD_MODEL_SETTINGS, ids=[t[2].split(" must")[0]
                                                                          for t in BAD_MODEL_SETTINGS])
def test_model_setting_values_fail_the_config_check_and_the_model_build_alike(model, settings, line):
    from slidemil.mil.models import create_model

    with pytest.raises(cfg.ConfigError) as checked:
        cfg.check_config({"mil": {"settings": {model: settings}}})
    assert str(checked.value).startswith(f"config: mil.settings.{line}"), str(checked.value)
    # The bench and the Python API build models from the same rules, naming the model instead of the config key.
    with pytest.raises(ValueError) as built:
        create_model(model, in_dim=8, **settings)
    assert str(built.value).startswith(f"config: {line}"), str(built.value)


def test_model_settings_within_the_rules_build():
    from slidemil.mil.models import create_model

    # The deepest stack embed_dim allows, and an MHIM model whose base settings come from the workflow.
    assert create_model("abmil", in_dim=8, embed_dim=4, n_layers=3).classifier.in_features == 1
    assert cfg.check_model_settings("mhim_abmil", {"base_kwargs": {"embed_dim": 4, "n_layers": 3}}, "m")
    with pytest.raises(cfg.ConfigError, match=r"^config: m\.base_kwargs\.n_layers must be at most 3"):
        cfg.check_model_settings("mhim_abmil", {"base_kwargs": {"embed_dim": 4, "n_layers": 4}}, "m")
    # The config's view leaves out what the workflow sets itself.
    with pytest.raises(cfg.ConfigError, match="mhim_abmil.base_kwargs: unknown setting"):
        cfg.check_config({"mil": {"settings": {"mhim_abmil": {"base_kwargs": {}}}}})


def test_partial_config_gets_every_default():
    got = cfg.check_config(TINY_SHEET_CONFIG)
    assert got["tiling"]["mpp"] == 1.0 and got["tiling"]["bright_threshold"] == 240
    assert got["features"]["settings"]["shufflenet_v2"]["input_px"] == 128
    assert got["features"]["settings"]["shufflenet_v2"]["scaled_decode"] is True
    assert set(got["features"]["settings"]) == set(cfg.DEFAULT_EXTRACTOR_SETTINGS)
    assert got["mil"]["training"]["patience"] == 4 and got["mil"]["training"]["weight_decay"] == 0.00001
    # precision stays absent unless given: filling it in would change every existing job's params
    assert "precision" not in got["mil"]["training"] and "precision" not in got["simclr"]
    assert got["simclr"] == {k: v for k, v in cfg.field_defaults(cfg.Simclr).items() if k != "precision"}
    assert cfg.check_config({}) == cfg.check_config(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


def test_key_order_is_snakemakes_merge_order():
    # params are compared by repr: the user's keys first, then the defaults' (config/config.yaml's order)
    got = cfg.check_config({"features": {"settings": {"resnet18": {"precision": "fp32"}}}})
    assert list(got["features"]["settings"]["resnet18"]) == ["precision", "weights", "input_px", "dtype",
                                                              "scaled_decode"]
    assert list(got["features"]["settings"])[0] == "resnet18"


def test_run_without_any_config_file_in_another_directory(tmp_path):
    # A partial --configfile and no config/config.yaml in the working directory: defaults come from slidemil.config.
    proc = dry_run(tmp_path, {"mil": {"models": ["abmil"]}, "splits": {"folds": 2}})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extract_features" in proc.stdout


def test_module_use_with_config(tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(f"""
module slidemil:
    snakefile: "{ROOT / 'workflow' / 'Snakefile'}"
    config: {{"results": "out", "mil": {{"models": ["abmil"]}}, "splits": {{"folds": 2}}}}

use rule * from slidemil as slidemil_*
""")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(snakefile), "-n", "--cores", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "out/train/resnet50_trunc/abmil/fold_1" in proc.stdout


def test_cross_field_rules():
    with pytest.raises(cfg.ConfigError, match=r"^config: features.settings.resnet18.weights: 'simclr' is for"):
        cfg.check_config({"features": {"extractors": ["resnet18"], "settings": {"resnet18": {"weights": "simclr"}}}})
    with pytest.raises(cfg.ConfigError, match=r"^config: features.settings.resnet18_simclr.input_px: 64 differs"):
        cfg.check_config({"features": {"extractors": ["resnet18_simclr"],
                                        "settings": {"resnet18_simclr": {"input_px": 64}}}})
    with pytest.raises(cfg.ConfigError, match=r"^config: splits.fold_column: makes every slide a test slide"):
        cfg.check_config({"splits": {"fold_column": "fold"}, "features": {"extractors": ["shufflenet_simclr"]}})
    with pytest.raises(cfg.ConfigError, match=r"^config: mil.models: tile_supervised trains on tiles"):
        cfg.check_config({"features": {"precomputed": "uni"}, "mil": {"models": ["tile_supervised"]}})
    with pytest.raises(cfg.ConfigError, match=r"^config: mil.settings.tile_supervised.epoch: unknown"):
        cfg.check_config({"mil": {"settings": {"tile_supervised": {"epoch": 1}}}})
    with pytest.raises(cfg.ConfigError, match=r"^config: mil.settings.mhim_abmil.base_kwargs: unknown setting"):
        cfg.check_config({"mil": {"settings": {"mhim_abmil": {"base_kwargs": {}}}}})


def test_config_yaml_equals_the_defaults():
    text = (ROOT / "config" / "config.yaml").read_text()
    # json.dumps compares the key order too: it decides how each job's params look
    assert json.dumps(yaml.safe_load(text)) == json.dumps(cfg.defaults())
    assert text.count("#") > 20  # the explanatory comments stay


def test_readme_is_up_to_date_and_every_setting_is_described():
    assert (ROOT / "config" / "README.md").read_text() == cfg.readme()
    schema = yaml.safe_load(cfg.SCHEMA.read_text())
    objects = dict(cfg.schema_objects(schema))
    for path, cls in cfg.SCHEMA_SECTIONS.items():
        props = objects[path]["properties"]
        assert [f.name for f in dataclasses.fields(cls)] == list(props), path
        for name, prop in props.items():
            assert prop.get("description"), f"{path}.{name} has no description"
    assert '"default":' not in json.dumps(schema)  # the defaults' one home is slidemil.config


def test_names_equal_the_real_registries():
    from slidemil.features.extractors import list_extractors
    from slidemil.features.extract import PRECISIONS
    from slidemil.mil.models import create_model, list_models, model_kwargs_defaults
    from slidemil.runtime import TRAIN_PRECISIONS

    assert sorted(names.MIL_MODELS) == list_models()
    for model in list_models():
        assert tuple(model_kwargs_defaults(model)) == names.MODEL_PARAMS[model], model
        params = inspect.signature(create_model.__globals__["_builder"](model)).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), model
    assert sorted(names.EXTRACTORS) == list_extractors()
    assert names.TRAIN_PRECISIONS == TRAIN_PRECISIONS and names.FEATURE_PRECISIONS == PRECISIONS
    assert [names.base_model(m) for m in ("mhim_abmil", "abmil")] == ["abmil", None]
    assert all(names.mhim_name(b) in list_models() for b in names.MHIM_BASES)
    # Every model setting has its value rule, and every model's own defaults keep to the rules.
    ruled = {f.name for f in dataclasses.fields(cfg.MILSettings)}
    assert {p for params in names.MODEL_PARAMS.values() for p in params} - ruled == set(cfg.WORKFLOW_MODEL_PARAMS)
    for model in names.MIL_MODELS:
        assert cfg.check_model_settings(model, model_kwargs_defaults(model), model) is not None


def test_stage_defaults_are_the_configs():
    from slidemil.mil import train
    from slidemil.pretrain import simclr, tile_supervised
    from slidemil.tiling.tile import TilingParams

    assert train.DEFAULT_TRAINING == cfg.field_defaults(cfg.Training)
    assert simclr.DEFAULT_SETTINGS == cfg.field_defaults(cfg.Simclr)
    assert tile_supervised.DEFAULT_SETTINGS == cfg.field_defaults(cfg.TileSupervised)
    tiling = cfg.field_defaults(cfg.Tiling)
    tiling.pop("on_error")
    assert dataclasses.asdict(TilingParams()) == tiling
    assert train.resolve_training({"weight_decay": 0})["weight_decay"] == 0.0


def features_cli_call(monkeypatch, argv: list[str]) -> dict:
    """What `slidemil features ARGV` hands extract_features, by name."""
    from slidemil.features import extract

    calls = []
    monkeypatch.setattr(extract, "extract_features", lambda slide, tiles, out, **kw: calls.append(kw))
    monkeypatch.setattr(extract, "setup_logging", lambda: None)
    extract.main(["slide.svs", "--tiles", "t.h5", "--out", "f.h5", *argv])
    return calls[0]


def test_features_cli_defaults_are_the_configs(monkeypatch, capsys):
    default = cfg.defaults()
    extractor = default["features"]["extractors"][0]
    call = features_cli_call(monkeypatch, [])
    assert call["extractor"] == extractor
    settings = {**cfg.field_defaults(cfg.ExtractorSettings), **default["features"]["settings"][extractor]}
    for name in ("weights", "input_px", "dtype", "precision", "scaled_decode"):
        assert call[name] == settings[name], name
    assert call["seed"] == default["seed"]
    compute = default["compute"]
    assert (call["device"], call["batch_size"], call["workers"], call["torch_compile"]) == (
        compute["device"], compute["batch_size"], compute["loader_workers"], compute["torch_compile"])

    # Another extractor gets its own settings from the config; the command line overrides any of them.
    call = features_cli_call(monkeypatch, ["--extractor", "shufflenet_simclr", "--no-scaled-decode", "--dtype",
                                           "float16", "--workers", "0"])
    simclr = default["features"]["settings"]["shufflenet_simclr"]
    assert (call["weights"], call["input_px"]) == (simclr["weights"], simclr["input_px"])
    assert (call["scaled_decode"], call["dtype"], call["workers"]) == (False, "float16", 0)

    # An extractor config/config.yaml does not list has no settings to default to: one usage line.
    with pytest.raises(SystemExit) as exit_:
        features_cli_call(monkeypatch, ["--extractor", "uni", "--input-px", "224", "--dtype", "float32"])
    assert exit_.value.code == 2
    assert "--weights is required for --extractor uni" in capsys.readouterr().err


def test_the_dag_imports_neither_torch_nor_opencv():
    code = "import sys, slidemil.config, slidemil.names; print(any(m in sys.modules for m in ('torch', 'cv2')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
