"""Config loading: arcface_torch config files, precedence of file < PFC_* environment < --set, parsing, validation."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

from partial_fc.engine.config import (
    CONFIGS_DIR,
    DEFAULTS,
    config_from_dict,
    config_to_dict,
    format_config,
    load_config,
    validate,
)
from partial_fc.errors import InputError, MissingInputError

HEAD = "from easydict import EasyDict as edict\nconfig = edict()\n"
SHIPPED = sorted(path.stem for path in CONFIGS_DIR.glob("*.py"))

# Every key of arcface_torch's configs/base.py and a job config, written as users write them.
ARCFACE_TORCH_CONFIG = """\
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.save_all_states = True
config.output = None
config.embedding_size = 512
config.sample_rate = 0.3
config.interclass_filtering_threshold = 0
config.fp16 = True
config.batch_size = 96
config.optimizer = "adamw"
config.lr = 0.001
config.momentum = 0.9
config.weight_decay = 0.1
config.verbose = 4000
config.frequent = 20
config.dali = False
config.dali_aug = False
config.gradient_acc = 2
config.seed = 7
config.num_workers = 4
config.wandb_key = "0123456789abcdef0123456789abcdef01234567"
config.suffix_run_name = None
config.using_wandb = False
config.wandb_entity = "entity"
config.wandb_project = "project"
config.wandb_log_all = True
config.save_artifacts = False
config.wandb_resume = False
config.rec = "/train_tmp/WebFace42M"
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = config.num_epoch // 10
config.val_targets = []
"""


@pytest.fixture(autouse=True)
def _known_backbones(monkeypatch):
    """A stand-in registry so the network check is exercised whether or not partial_fc.backbones exists yet."""
    try:
        from partial_fc.backbones import list_models  # noqa: F401
    except ImportError:
        fake = types.ModuleType("partial_fc.backbones")
        fake.list_models = lambda: ["mbf", "r18", "r34", "r50", "r100", "r200"]
        monkeypatch.setitem(sys.modules, "partial_fc.backbones", fake)


def write(tmp_path: Path, text: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_configs_exist():
    assert {"ms1mv3_r50", "glint360k_r100", "wf42m_pfc02_r50", "synthetic"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_loads_and_validates(name):
    config = load_config(name, environ={})
    validate(config)
    assert set(config) == set(DEFAULTS)
    assert load_config(f"configs/{name}.py", environ={}) == config
    assert load_config(str(CONFIGS_DIR / f"{name}.py"), environ={}) == config
    header = (CONFIGS_DIR / f"{name}.py").read_text().splitlines()[0]
    assert header.startswith("# ")


def test_shipped_values_match_arcface_torch():
    ms1m = load_config("ms1mv3_r50", environ={})
    assert (ms1m.margin_list, ms1m.network, ms1m.lr) == ((1.0, 0.5, 0.0), "r50", 0.1)
    assert (ms1m.num_classes, ms1m.num_image, ms1m.num_epoch) == (93431, 5179510, 20)
    assert ms1m.output == "work_dirs/ms1mv3_r50" and ms1m.val_dir == ms1m.rec
    glint = load_config("glint360k_r100", environ={})
    assert (glint.margin_list, glint.sample_rate, glint.num_classes) == ((1.0, 0.0, 0.4), 0.1, 360232)
    wf = load_config("wf42m_pfc02_r50", environ={})
    assert (wf.sample_rate, wf.num_classes, wf.num_image, wf.batch_size) == (0.2, 2059906, 42474557, 512)
    synthetic = load_config("synthetic", environ={})
    assert (synthetic.rec, synthetic.network, synthetic.num_image) == ("data/synthetic", "r10_nano", 400 * 20)


def test_defaults_alone_validate():
    config = load_config(None, environ={})
    assert config.output == DEFAULTS["output"] and config.val_dir == DEFAULTS["rec"]


def test_arcface_torch_config_file_loads(tmp_path):
    path = write(tmp_path, ARCFACE_TORCH_CONFIG, "wf42m_pfc03_40epoch_8gpu_vit_b.py")
    config = load_config(str(path), environ={})
    assert config.margin_list == (1.0, 0.0, 0.4)
    assert config.optimizer == "adamw" and config.gradient_acc == 2 and config.warmup_epoch == 4
    assert isinstance(config.interclass_filtering_threshold, float)
    assert config.output == str(Path("work_dirs") / "wf42m_pfc03_40epoch_8gpu_vit_b")
    assert config.val_targets == [] and config.clip_grad_norm == DEFAULTS["clip_grad_norm"]


def test_legacy_loss_key_becomes_margin_list(tmp_path):
    text = HEAD + "config.loss = 'cosface'\n"
    assert load_config(str(write(tmp_path, text)), environ={}).margin_list == (1.0, 0.0, 0.4)
    clash = text + "config.margin_list = (1.0, 0.5, 0.0)\n"
    with pytest.raises(InputError, match="margin_list"):
        load_config(str(write(tmp_path, clash)), environ={})
    with pytest.raises(InputError, match="'softmax'"):
        load_config(str(write(tmp_path, text.replace("cosface", "softmax"))), environ={})
    with pytest.raises(InputError, match=r"loss = \['arcface'\]"):
        load_config(str(write(tmp_path, text.replace("'cosface'", "['arcface']"))), environ={})


def test_precedence_file_then_env_then_set(tmp_path):
    path = write(tmp_path, HEAD + "config.lr = 0.2\nconfig.batch_size = 32\nconfig.seed = 5\n")
    env = {"PFC_LR": "0.3", "PFC_BATCH_SIZE": "48", "HOME": "/x"}
    config = load_config(str(path), ["batch_size=64"], environ=env)
    assert (config.lr, config.batch_size, config.seed, config.momentum) == (0.3, 64, 5, DEFAULTS["momentum"])
    assert load_config(str(path), environ={}).lr == 0.2


def test_environment_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("PFC_NUM_WORKERS", "7")
    assert load_config(None).num_workers == 7


@pytest.mark.parametrize(
    "item, key, expected",
    [
        ("fp16=true", "fp16", True),
        ("fp16=No", "fp16", False),
        ("resume=1", "resume", True),
        ("resume=auto", "resume", "auto"),
        ("resume=runs/a/checkpoints", "resume", "runs/a/checkpoints"),
        ("resume=Auto", "resume", "auto"),
        ("channels_last=yes", "channels_last", True),
        ("batch_size=256", "batch_size", 256),
        ("lr=1e-3", "lr", 0.001),
        ("sample_rate=1", "sample_rate", 1.0),
        ("warmup_epoch=1.5", "warmup_epoch", 1.5),
        ("warmup_epoch=2", "warmup_epoch", 2),
        ("network=r100", "network", "r100"),
        ("margin_list=1.0,0.0,0.4", "margin_list", (1.0, 0.0, 0.4)),
        ("margin_list=(1, 0.5, 0)", "margin_list", (1.0, 0.5, 0.0)),
        ("margin_list=[1.0, 0.3, 0.2]", "margin_list", (1.0, 0.3, 0.2)),
        ("val_targets=lfw, agedb_30", "val_targets", ["lfw", "agedb_30"]),
        ("val_targets=['cfp_fp']", "val_targets", ["cfp_fp"]),
        ("val_targets=", "val_targets", []),
        ("init_weights=none", "init_weights", None),
        ("init_weights=/w/backbone.pth", "init_weights", "/w/backbone.pth"),
        ("val_dir=NULL", "val_dir", DEFAULTS["rec"]),
        ("suffix_run_name=Null", "suffix_run_name", None),
        ("notes=a=b", "notes", "a=b"),
    ],
)
def test_text_values_parse_to_the_default_type(item, key, expected):
    value = load_config(None, [item], environ={})[key]
    assert value == expected and type(value) is type(expected)
    env_value = load_config(None, environ={"PFC_" + key.upper(): item.partition("=")[2]})[key]
    assert env_value == expected and type(env_value) is type(expected)


@pytest.mark.parametrize(
    "item, key",
    [
        ("fp16=maybe", "fp16"),
        ("batch_size=12.5", "batch_size"),
        ("lr=fast", "lr"),
        ("margin_list=1.0,x,0", "margin_list"),
        ("margin_list=(1.0,", "margin_list"),
        ("val_targets=[1, 2]", "val_targets"),
    ],
)
def test_unparsable_text_names_key_and_source(item, key):
    with pytest.raises(InputError) as caught:
        load_config(None, [item], environ={})
    assert key in str(caught.value) and "--set" in str(caught.value)


def test_wrong_python_type_in_file(tmp_path):
    path = write(tmp_path, HEAD + "config.batch_size = '128'\n")
    with pytest.raises(InputError, match=r"batch_size = '128' \(from config file .*job.py\) must be an integer"):
        load_config(str(path), environ={})


def test_typo_in_file_suggests_key(tmp_path):
    path = write(tmp_path, HEAD + "config.sample_rat = 0.1\n")
    with pytest.raises(InputError) as caught:
        load_config(str(path), environ={})
    message = str(caught.value)
    assert "'sample_rat'" in message and str(path) in message and "did you mean 'sample_rate'" in message


def test_typo_in_environment_suggests_variable():
    with pytest.raises(InputError) as caught:
        load_config(None, environ={"PFC_BATCHSIZE": "64"})
    message = str(caught.value)
    assert "environment variable PFC_BATCHSIZE" in message and "did you mean PFC_BATCH_SIZE" in message


def test_typo_in_set_suggests_key():
    with pytest.raises(InputError) as caught:
        load_config(None, ["embeding_size=256"], environ={})
    message = str(caught.value)
    assert "--set embeding_size=256" in message and "did you mean 'embedding_size'" in message


def test_set_without_equals_is_rejected():
    with pytest.raises(InputError, match="not key=value"):
        load_config(None, ["lr"], environ={})


BAD_VALUES = [
    ("on_save_error", "retry"),
    ("margin_list", "1.0,0.5"),
    ("margin_list", "0.0,0.5,0.0"),
    ("margin_list", "1.0,nan,0.0"),
    ("network", "r51"),
    ("embedding_size", "0"),
    ("sample_rate", "0"),
    ("sample_rate", "1.5"),
    ("interclass_filtering_threshold", "1.0"),
    ("interclass_filtering_threshold", "-0.1"),
    ("batch_size", "0"),
    ("optimizer", "lamb"),
    ("lr", "0"),
    ("lr", "inf"),
    ("momentum", "1.0"),
    ("momentum", "-0.5"),
    ("weight_decay", "-1e-4"),
    ("verbose", "0"),
    ("frequent", "-1"),
    ("gradient_acc", "0"),
    ("seed", "-1"),
    ("num_workers", "-1"),
    ("num_classes", "0"),
    ("num_image", "-5"),
    ("num_epoch", "0"),
    ("warmup_epoch", "-1"),
    ("warmup_epoch", "20"),
    ("rec", ""),
    ("output", ""),
    ("backend", "nccl"),
    ("storage_dtype", "float64"),
    ("amp_dtype", "float32"),
    ("clip_grad_norm", "-1"),
    ("stall_timeout", "-5"),
    ("max_nonfinite_steps", "0"),
    ("max_bad_records", "-1"),
    ("keep_checkpoints", "0"),
    ("checkpoint_every", "-1"),
    ("perf_steps", "-1"),
    ("lr_power", "0"),
    ("margin_scale", "-1"),
    ("val_batch_size", "0"),
    ("image_size", "224"),
    ("freeze_backbone_steps", "-1"),
    ("momentum_dtype", "float8"),
    ("backbone_lr_mult", "0"),
    ("backbone_lr_mult", "nan"),
]


@pytest.mark.parametrize("key, text", BAD_VALUES)
def test_range_checks_reject_with_key_value_and_source(key, text):
    with pytest.raises(InputError) as caught:
        load_config(None, [f"{key}={text}"], environ={})
    message = str(caught.value)
    assert f"{key} = " in message and f"--set {key}={text}" in message


def test_every_rule_has_a_bad_value_case():
    from partial_fc.engine.config import _RULES

    assert set(_RULES) - {key for key, _ in BAD_VALUES} == set()


def test_validate_reports_every_problem_of_a_hand_built_config():
    config = dict(load_config(None, environ={}))
    config.update(lr=-1.0, batch_size=0, fp16="yes", extra_key=1)
    del config["seed"]
    with pytest.raises(InputError) as caught:
        validate(config)
    message = str(caught.value)
    for needle in ("lr = -1.0", "batch_size = 0", "fp16 = 'yes'", "'extra_key'", "lacks keys: seed"):
        assert needle in message


def test_network_check_uses_the_backbone_registry(monkeypatch):
    fake = types.ModuleType("partial_fc.backbones")
    fake.list_models = lambda: ["r50", "mbf"]
    monkeypatch.setitem(sys.modules, "partial_fc.backbones", fake)
    assert load_config(None, ["network=mbf"], environ={}).network == "mbf"
    with pytest.raises(InputError, match=r"network = 'r51' .*registered backbone \(r50, mbf\); did you mean 'r50'"):
        load_config(None, ["network=r51"], environ={})


def test_missing_or_wrong_config_file(tmp_path):
    with pytest.raises(MissingInputError, match="did you mean 'ms1mv3_r50'"):
        load_config("ms1mv3_r5", environ={})
    with pytest.raises(MissingInputError, match="nowhere.py"):
        load_config(str(tmp_path / "nowhere.py"), environ={})
    with pytest.raises(InputError, match="not a Python"):
        load_config(str(write(tmp_path, "lr: 0.1", "job.yaml")), environ={})


def test_broken_config_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"line 3\): ZeroDivisionError"):
        load_config(str(write(tmp_path, HEAD + "config.lr = 1 / 0\n")), environ={})
    with pytest.raises(InputError, match="SyntaxError"):
        load_config(str(write(tmp_path, "config = edict(\n")), environ={})
    with pytest.raises(InputError, match="must define `config`"):
        load_config(str(write(tmp_path, "cfg = {}\n")), environ={})


def test_unimplemented_settings_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="partial_fc.engine.config"):
        load_config(None, ["dali=true", "using_wandb=true"], environ={})
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "dali=True" in lines[0] and "using_wandb=True" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="partial_fc.engine.config"):
        load_config(None, environ={})
    assert caplog.records == []


def test_format_config_lists_every_key_and_redacts_the_wandb_key(tmp_path):
    config = load_config(str(write(tmp_path, ARCFACE_TORCH_CONFIG)), environ={})
    text = format_config(config)
    for key in DEFAULTS:
        assert f"\n  {key} " in text
    assert "0123456789abcdef" not in text
    assert '"adamw"   (default "sgd")' in text


def test_config_to_dict_round_trips_through_json_in_a_fresh_interpreter(tmp_path):
    path = write(tmp_path, ARCFACE_TORCH_CONFIG)
    script = (
        "import json, sys; from partial_fc.engine.config import load_config, config_to_dict; "
        "print(json.dumps(config_to_dict(load_config(sys.argv[1], ['lr=0.05'], environ={}), redact=False)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    expected = load_config(str(path), ["lr=0.05"], environ={})
    assert config_from_dict(data) == expected
    assert data["margin_list"] == [1.0, 0.0, 0.4] and data["wandb_key"] == expected.wandb_key
    assert config_to_dict(expected)["wandb_key"] == "<redacted>"


def test_config_from_dict_rejects_unknown_and_bad_values():
    with pytest.raises(InputError, match="did you mean 'lr'"):
        config_from_dict({"lrr": 0.1})
    with pytest.raises(InputError, match="sample_rate = 2.0 .from checkpoint"):
        config_from_dict({"sample_rate": 2.0}, source="checkpoint")


def test_on_save_error_is_stop_or_continue():
    assert load_config(None, environ={}).on_save_error == "stop"
    assert load_config(None, ["on_save_error=continue"], environ={}).on_save_error == "continue"
    with pytest.raises(
        InputError, match="on_save_error = 'retry' .from --set on_save_error=retry. must be one of stop, continue"
    ):
        load_config(None, ["on_save_error=retry"], environ={})
