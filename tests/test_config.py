"""Job files, dotted overrides and their validation; the learning-rate schedule."""
from pathlib import Path

import pytest

from pipeline.config import ConfigError, dump, enabled_stages, load_config, parse_overrides, with_defaults
from pipeline.schedule import lr_factor, scaled_lr

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def test_demo_is_the_default_job():
    cfg = load_config(None, [])
    assert cfg["job"] == "demo"
    assert cfg["data"]["generate"] is True
    assert enabled_stages(cfg) == ["warmup", "joint"]


@pytest.mark.parametrize("job", sorted(p.relative_to(JOBS) for p in JOBS.rglob("*.yaml") if "accelerate" not in p.parts))
def test_every_shipped_job_resolves(job):
    cfg = load_config(JOBS / job, ["data.root=/data"])
    assert cfg["data"]["root"] == "/data"
    assert cfg["job"] != "unnamed"


def test_paper_schedule_in_cifar10_r110():
    cfg = load_config(JOBS / "cifar10_r110.yaml", ["data.root=/d"])
    assert cfg["stages"]["warmup"]["epochs"] == 30
    assert cfg["stages"]["joint"] == {"epochs": 320, "milestones": [250, 300], "mode": "joint", "hard_tail": 0.25}
    assert (cfg["model"]["d"], cfg["model"]["gamma"], cfg["model"]["r"]) == (256, 0.5, 2)
    assert (cfg["loss"]["alpha"], cfg["loss"]["phi"]) == (0.2, 0.5)


def test_extends_layers_base_then_child():
    cfg = load_config(JOBS / "ablation" / "cifar10_r110_vanilla.yaml", ["data.root=/d"])
    assert cfg["model"]["gamma"] == 0.0 and cfg["loss"]["alpha"] == 0.0
    assert cfg["model"]["arch"] == "resnet110"  # from the base
    assert enabled_stages(cfg) == ["joint"]


def test_overrides_parse_yaml_values():
    assert parse_overrides(["optim.lr=0.2", "stages.joint.milestones=[1, 2]", "train.deterministic=true"]) == {
        "optim": {"lr": 0.2}, "stages": {"joint": {"milestones": [1, 2]}}, "train": {"deterministic": True}}
    cfg = load_config(None, ["optim.lr=0.2", "model.gamma=auto", "optim.weight_decay=0"])
    assert cfg["optim"]["lr"] == 0.2 and cfg["model"]["gamma"] == "auto"
    assert cfg["optim"]["weight_decay"] == 0.0 and isinstance(cfg["optim"]["weight_decay"], float)


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=0.1", "optim.lrr"),
    ("nosuch=1", "nosuch"),
    ("data.batchsize=3", "batchsize"),
    ("data.batch_size=big", "data.batch_size"),
    ("train.deterministic=3", "train.deterministic"),
    ("model=3", "model"),
    ("stages.joint.mode=fast", "stages.joint.mode"),
    ("data.root=", "data.root"),
    ("train.compile=fast", "train.compile"),
    ("model.router_norm=layer", "model.router_norm"),
    ("stages.joint.hard_tail=1.5", "stages.joint.hard_tail"),
    ("loss.cost_over=image", "loss.cost_over"),
    ("stages.warmup.hard_tail=0.5", "stages.warmup.hard_tail"),
    ("optim.lr=abc", "optim.lr"),
    ("optim.lr=null", "optim.lr"),
    ("model.gamma=half", "model.gamma"),
    ("model.gamma=1.5", "model.gamma"),
    ("stages.joint.milestones=[1.5]", "stages.joint.milestones"),
    ("stages.joint.epochs=0", "stages.joint.epochs"),
    ("stages.warmup.epochs=-1", "stages.warmup.epochs"),
    ("data.root=3", "data.root"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "config key 'optim.lr' must be of type float (like the default 0.05), got 'abc'"),
    ("optim.lr=true", "config key 'optim.lr' must be of type float (like the default 0.05), got True"),
    ("optim.lr=null", "config key 'optim.lr' must be of type float (like the default 0.05), got None"),
    ("data.batch_size=2.0", "config key 'data.batch_size' must be of type int (like the default 32), got 2.0"),
    ("model.gamma=half", "config key 'model.gamma' must be of type float or 'auto' (like the default 0.5), got 'half'"),
    ("model.pretrained=3", "config key 'model.pretrained' must be of type str or null (like the default None), got 3"),
    ("stages.joint.milestones=[x]", "must be of type list of int (like the default [2]), got ['x']"),
    ("train.compile=fast", "config key 'train.compile' must be one of none, default, reduce-overhead, max-autotune"),
    ("stages.joint.hard_tail=1.5", "config key 'stages.joint.hard_tail' must be in [0, 1], got 1.5"),
    ("stages.joint.epochs=0", "config key 'stages.joint.epochs' must be >= 1, got 0"),
])
def test_a_bad_value_is_refused_naming_the_expected_type(override, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [override])
    assert message in str(refused.value)


def test_strings_are_not_numbers_but_yaml_numbers_are(tmp_path):
    """A quoted number is a string, refused for a number key, in a job file as in an override; an
    unquoted 5e-4 is a number (PyYAML alone would read it as a string)."""
    job = tmp_path / "j.yaml"
    job.write_text('job: x\noptim: {lr: "0.1"}\n')
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be of type float .*got '0\.1'"):
        load_config(job, ["data.root=/d"])
    with pytest.raises(ConfigError, match=r"'optim\.lr' must be of type float"):
        load_config(None, ["optim.lr='0.1'"])
    job.write_text("job: x\noptim: {weight_decay: 5e-4}\n")
    optim = load_config(job, ["data.root=/d", "optim.lr=1e-1"])["optim"]
    assert (optim["lr"], optim["weight_decay"]) == (0.1, 5e-4)
    cfg = load_config(None, ["model.gamma=1", "model.pretrained=null", "train.log_every=5"])
    assert cfg["model"]["gamma"] == 1.0 and isinstance(cfg["model"]["gamma"], float)
    assert cfg["model"]["pretrained"] is None and cfg["train"]["log_every"] == 5


def test_the_schema_is_the_defaults_and_names_what_others_read():
    import inspect

    import rdinet
    from pipeline.config import DEFAULTS, LEAVES, MODEL_ARGS, NOT_IN_WARMUP, Config
    from pipeline.data.defaults import DATA_DEFAULTS
    from pipeline.rundir import RESUMABLE_KEYS, flatten
    assert DEFAULTS["data"] == DATA_DEFAULTS and set(flatten(DEFAULTS)) == set(LEAVES)
    assert Config().stages.joint.milestones == [250, 300] and Config().model.router_norm == "none"
    assert set(MODEL_ARGS) <= set(inspect.signature(rdinet.create_model).parameters) and "pretrained" not in MODEL_ARGS
    for key in NOT_IN_WARMUP + RESUMABLE_KEYS:
        assert key in LEAVES or any(leaf.startswith(key + ".") for leaf in LEAVES), key


def test_whole_step_cuda_graph_refuses_compiles_with_their_own_graphs():
    assert load_config(None, ["train.cuda_graph=true", "train.compile=default"])["train"]["cuda_graph"]
    with pytest.raises(ConfigError, match="train.compile=default"):
        load_config(None, ["train.cuda_graph=true", "train.compile=reduce-overhead"])


def test_unknown_job_file_lists_the_shipped_jobs(tmp_path):
    with pytest.raises(ConfigError, match="cifar10_r110"):
        load_config(tmp_path / "nope.yaml", [])


def test_job_file_with_unknown_key(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("job: x\nmodle: {arch: resnet20}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(job, [])


def test_lr_schedule_steps_and_warmup():
    spe = 10
    assert lr_factor(0, spe, [2, 4], 0.1, 0) == 1.0
    assert lr_factor(19, spe, [2, 4], 0.1, 0) == 1.0
    assert lr_factor(20, spe, [2, 4], 0.1, 0) == pytest.approx(0.1)
    assert lr_factor(45, spe, [2, 4], 0.1, 0) == pytest.approx(0.01)
    assert lr_factor(4, spe, [], 0.1, 1.0) == pytest.approx(0.5)  # half way through a 1-epoch warm-up
    assert scaled_lr({"lr": 0.1, "reference_batch": 256}, 1024) == pytest.approx(0.4)
    assert scaled_lr({"lr": 0.1, "reference_batch": 0}, 1024) == 0.1


def test_the_captured_step_hint_applies_to_jpegs_decoded_on_the_gpu():
    from pipeline.trainer import _decodes_jpegs_on_gpu
    imagenet = {"dataset": "imagenet", "root": "/data"}
    assert _decodes_jpegs_on_gpu(imagenet) and _decodes_jpegs_on_gpu({**imagenet, "device": "gpu"})
    assert not _decodes_jpegs_on_gpu({**imagenet, "decode_device": "cpu"})
    assert not _decodes_jpegs_on_gpu({**imagenet, "device": "cpu"})
    assert not _decodes_jpegs_on_gpu({"dataset": "cifar10", "root": "/data"})


def test_shipped_cifar_jobs_route_with_batch_norm_and_the_paper_stays_selectable():
    """The gates the routing study chose (docs/method.md) are the CIFAR jobs' default; the key's own
    default, the paper's router, is what the R-32 study and the study's paper row ran."""
    for job in ("demo.yaml", "cifar10_r110.yaml", "cifar10_r32.yaml", "cifar100_r110.yaml"):
        model = load_config(JOBS / job, ["data.root=/d"])["model"]
        assert (model["router_norm"], model["straight_through"]) == ("batch", False), job
    paper = load_config(JOBS / "cifar10_r110_short" / "paper.yaml", ["data.root=/d"])["model"]
    assert (paper["router_norm"], paper["straight_through"]) == ("none", False)
    assert load_config(JOBS / "cifar10_r32_short" / "full.yaml", ["data.root=/d"])["model"]["router_norm"] == "none"


def test_hard_tail_is_the_last_share_of_the_joint_epochs():
    from pipeline.trainer import hard_tail_start
    assert hard_tail_start({"epochs": 20, "hard_tail": 0.25}, "joint") == 15
    assert hard_tail_start({"epochs": 20, "hard_tail": 1.0}, "joint") == 0
    assert hard_tail_start({"epochs": 20, "hard_tail": 0.0}, "joint") == float("inf")
    assert hard_tail_start({"epochs": 20, "hard_tail": 0.25}, "full") == float("inf")  # no routers, no gates
    assert load_config(JOBS / "cifar10_r110.yaml", ["data.root=/d"])["stages"]["joint"]["hard_tail"] == 0.25
    assert load_config(JOBS / "cifar10_r110_short" / "paper.yaml", ["data.root=/d"])["stages"]["joint"]["hard_tail"] == 0


def test_a_config_saved_before_a_key_existed_gets_its_default():
    saved = load_config(None, [])
    del saved["model"]["router_norm"]
    filled = with_defaults(saved)
    assert filled["model"]["router_norm"] == "none" and filled["job"] == "demo"
    with pytest.raises(ConfigError, match="model.nosuch"):
        with_defaults({"model": {"nosuch": 1}})
    with pytest.raises(ConfigError, match="optim.lr"):
        with_defaults({"optim": {"lr": "0.1"}})


def test_a_run_directory_from_before_router_norm_resumes(tmp_path):
    """A run started before model.router_norm existed (its config.yaml lacks the key) is the
    paper's router: the same job with router_norm none may resume there, router_norm batch not."""
    from pipeline.rundir import check_run_dir
    cfg = load_config(JOBS / "cifar10_r110_short" / "paper.yaml", ["data.root=/d"])
    old = {**cfg, "model": {k: v for k, v in cfg["model"].items() if k != "router_norm"}}
    (tmp_path / "config.yaml").write_text(dump(old))
    assert check_run_dir(tmp_path, cfg) == {}
    other = load_config(JOBS / "cifar10_r110_short" / "paper.yaml", ["data.root=/d", "model.router_norm=batch"])
    with pytest.raises(ValueError, match="model.router_norm: 'none' \\(saved\\) -> 'batch' \\(this run\\)"):
        check_run_dir(tmp_path, other)


def test_a_run_directory_refuses_changed_settings_by_name_and_takes_a_moved_dataset(tmp_path):
    from pipeline.rundir import check_run_dir, record_config
    run_dir = tmp_path / "run"
    cfg = load_config(None, ["data.root=/data/old"])
    assert check_run_dir(run_dir, cfg) == {} and not run_dir.exists()  # checking writes nothing
    record_config(run_dir, cfg)
    saved = (run_dir / "config.yaml").read_bytes()
    changed = load_config(None, ["data.root=/data/old", "optim.lr=0.2", "stages.joint.milestones=[1]"])
    with pytest.raises(ValueError) as refused:
        check_run_dir(run_dir, changed)
    message = str(refused.value)
    assert "optim.lr: 0.05 (saved) -> 0.2 (this run)" in message
    assert "stages.joint.milestones: [2] (saved) -> [1] (this run)" in message
    assert "--run-dir" in message and "data.root" not in message.split("A resume may change")[0]
    assert (run_dir / "config.yaml").read_bytes() == saved
    moved = load_config(None, ["data.root=/data/new", "train.stop_at_step=7"])
    assert check_run_dir(run_dir, moved) == {"data.root": ("/data/old", "/data/new"),
                                             "train.stop_at_step": (0, 7)}
    record_config(run_dir, moved)
    assert check_run_dir(run_dir, moved) == {}
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # written atomically: no temp file left


def test_the_config_knows_the_library_choices():
    from pipeline.config import COST_OVER, ROUTER_NORMS
    from rdinet.losses import COST_OVER as LIBRARY_COST_OVER
    from rdinet.routers import NORMS
    assert COST_OVER == LIBRARY_COST_OVER and ROUTER_NORMS == tuple(NORMS)


def test_the_cifar_jobs_take_the_cost_over_the_network_and_the_studies_keep_theirs():
    def cost_over(job):
        return load_config(JOBS / job, ["data.root=/d"])["loss"]["cost_over"]
    assert cost_over("cifar10_r110.yaml") == cost_over("cifar100_r110.yaml") == "network"
    assert cost_over("cifar10_r110_short.yaml") == cost_over("cifar10_r32_short.yaml") == "block"
    assert cost_over("cifar10_r110_short/netcost.yaml") == "network"
    assert cost_over("imagenet_r50.yaml") == "block"  # not measured there: the paper's eq. 15
