"""pipeline/checkpoint.py on its own (no training): a full disk during the final export, and
replacing a checkpoint or export that already exists."""
import json

import pytest

import rdinet
from pipeline.checkpoint import CheckpointError, export_final, file_sha256, list_checkpoints, load_final_weights
from pipeline.checkpoint import _replace_dir
from test_faults_harness import leftovers, relative_files
from test_faults_harness import small_disk  # noqa: F401  (a fixture)


def resnet20_weights():
    return rdinet.create_model("resnet20", num_classes=10, d=32).state_dict()


MANIFEST = {"stage": "warmup", "job": "demo", "arch": "resnet20", "num_classes": 10}


def test_export_on_a_full_disk_says_where_and_what_to_do_and_leaves_nothing(tmp_path, small_disk):
    stage_dir = tmp_path / "run" / "warmup"
    small_disk(stage_dir, "256k")  # the weights take about 1.2 MB
    with pytest.raises(CheckpointError) as error:
        export_final(stage_dir, resnet20_weights(), MANIFEST)
    message = str(error.value)
    assert message.startswith(f"writing {stage_dir}/.tmp-final failed: ")
    assert f"{stage_dir} has 0." in message and "MiB free: if the disk is full" in message
    assert message.endswith("run the same command again: the stage resumes from its last checkpoint and exports again")
    assert list(stage_dir.iterdir()) == []  # the partial export is gone, its space given back


def test_an_export_replaces_an_older_one_whole(tmp_path):
    stage_dir = tmp_path / "warmup"
    export_final(stage_dir, resnet20_weights(), MANIFEST)
    weights = resnet20_weights()
    final = export_final(stage_dir, weights, MANIFEST)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["final"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["weights_sha256"] == file_sha256(final / "model.safetensors")
    loaded = load_final_weights(stage_dir, "resnet20", 10)
    assert all((loaded[k] == v.float()).all() for k, v in weights.items() if v.is_floating_point())


def test_replacing_a_checkpoint_of_the_same_step_leaves_only_the_new_one(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for name, content in (("step-00000004", "old"), (".tmp-step-00000004", "new")):
        (ckpt_dir / name).mkdir(parents=True)
        (ckpt_dir / name / "trainer.json").write_text(json.dumps({"step": 4, "content": content}))
    _replace_dir(ckpt_dir / ".tmp-step-00000004", ckpt_dir / "step-00000004")
    assert list_checkpoints(ckpt_dir) == [ckpt_dir / "step-00000004"]
    assert json.loads((ckpt_dir / "step-00000004" / "trainer.json").read_text())["content"] == "new"
    assert relative_files(ckpt_dir) == ["step-00000004/trainer.json"] and leftovers(tmp_path) == []


def test_the_export_removes_the_stage_s_checkpoint_leftovers_and_keeps_its_checkpoints(tmp_path):
    """A stage killed while deleting an old checkpoint or writing one, then resumed to its end:
    once `final` exists nothing half-written is left (nothing would ever prune it later)."""
    ckpt_dir = tmp_path / "warmup" / "checkpoints"
    for name in (".tmp-step-00000001.old", ".tmp-step-00000004", "step-00000003"):
        (ckpt_dir / name).mkdir(parents=True)
        (ckpt_dir / name / "trainer.json").write_text("{}")
    export_final(tmp_path / "warmup", resnet20_weights(), MANIFEST)
    assert leftovers(tmp_path) == []
    assert list_checkpoints(ckpt_dir) == [ckpt_dir / "step-00000003"]
