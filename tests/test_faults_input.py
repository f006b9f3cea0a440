"""Bad input given to pipeline/train.py: exit code 2, a message naming the key or file and the fix,
and everything saved before left as it was.

Bad input already covered elsewhere (see docs/reliability.md): dataset folders and files at the
loader (tests/test_data_errors.py, tests/test_data_check.py), config keys at load_config
(tests/test_config.py), and through train.py a missing dataset, `--stage joint` before the warm-up,
a run directory of another job or model and a NaN loss (tests/test_train.py).
"""
import re
import shutil

import pytest

import rdinet
from pipeline.checkpoint import export_final, file_sha256
from test_faults_harness import relative_files, run, tail, train_command

pytestmark = pytest.mark.slow

JOINT_ONLY = ["stages.warmup.epochs=0", "stages.joint.epochs=1", "stages.joint.milestones=[]"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "cifar"


def fingerprint(folder):
    """{relative path: sha256} of every file under folder: to show it was left untouched."""
    return {name: file_sha256(folder / name) for name in relative_files(folder)}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; known keys here: "),
    ("data.batch_size=big", "config key 'data.batch_size' must be of type int (like the default 32), got 'big'"),
])
def test_a_bad_config_key_or_value_is_refused_before_anything_is_written(data_dir, tmp_path, override, message):
    code, out = run(train_command(tmp_path / "run", data_dir, override, processes=1), tmp_path / "log")
    assert code == 2 and f"error: {message}" in out, tail(out)
    assert not (tmp_path / "run").exists()


def write_warmup_export(run_dir, arch, num_classes):
    """A real warm-up export (final/model.safetensors + manifest) of the given model."""
    model = rdinet.create_model(arch, num_classes=num_classes, d=32)
    manifest = {"stage": "warmup", "job": "demo", "arch": arch, "num_classes": num_classes}
    return export_final(run_dir / "warmup", model.state_dict(), manifest)


@pytest.mark.parametrize("arch, num_classes, damage, message", [
    ("resnet32", 10, None, "warmup/final holds a resnet32 with 10 classes, but this job builds a resnet20 with 10 "
                           "classes: use a run directory of this job (--run-dir) or fix model.*"),
    ("resnet20", 100, None, "warmup/final holds a resnet20 with 100 classes, but this job builds a resnet20 with 10"),
    ("resnet20", 10, "corrupt", "model.safetensors does not match the hash in its manifest: the file is corrupt; "
                                "re-run the 'warmup' stage in a new run directory"),
])
def test_a_warmup_export_that_does_not_fit_is_refused_and_kept(data_dir, tmp_path, arch, num_classes, damage,
                                                               message):
    run_dir = tmp_path / "run"
    final = write_warmup_export(run_dir, arch, num_classes)
    if damage == "corrupt":
        weights = bytearray((final / "model.safetensors").read_bytes())
        weights[-100] ^= 0xFF
        (final / "model.safetensors").write_bytes(bytes(weights))
    before = fingerprint(final)
    code, out = run(train_command(run_dir, data_dir, processes=1), tmp_path / "log")
    assert code == 2 and f"error: {run_dir}/" in out and message in out, tail(out)
    assert fingerprint(final) == before
    assert not (run_dir / "joint" / "checkpoints").exists()


@pytest.fixture(scope="module")
def checkpoint_of_100_classes(data_dir, tmp_path_factory):
    """A real resumable checkpoint (1 process, step 1) of a resnet20 with 100 classes."""
    run_dir = tmp_path_factory.mktemp("other") / "run"
    run(train_command(run_dir, data_dir, *JOINT_ONLY, "model.num_classes=100", "train.stop_at_step=1",
                      processes=1), run_dir.parent / "log", check=75)
    return run_dir


def test_a_checkpoint_of_another_class_count_is_refused_and_kept(checkpoint_of_100_classes, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint_of_100_classes / "joint", run_dir / "joint")  # moved in by hand
    checkpoint = run_dir / "joint" / "checkpoints" / "step-00000001"
    before = fingerprint(checkpoint)
    code, out = run(train_command(run_dir, data_dir, *JOINT_ONLY, processes=1), tmp_path / "log")
    assert code == 2, tail(out)
    assert f"error: checkpoint {checkpoint} does not fit this run (" in out, tail(out)
    assert "size mismatch for fc.weight" in out and "move " in out and "--run-dir" in out, tail(out)
    assert fingerprint(checkpoint) == before


def test_a_checkpoint_of_another_process_count_is_refused_and_kept(checkpoint_of_100_classes, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint_of_100_classes, run_dir)
    checkpoint = run_dir / "joint" / "checkpoints" / "step-00000001"
    before = fingerprint(checkpoint)
    code, out = run(train_command(run_dir, data_dir, *JOINT_ONLY, "model.num_classes=100", processes=2),
                    tmp_path / "log")
    summary = re.findall(r"^\s*exitcode\s+:\s+(-?\d+) \(pid", out, re.MULTILINE)  # one line per worker
    assert code != 0 and summary == ["2", "2"], tail(out)  # both workers: bad input
    assert (f"error: checkpoint {checkpoint} was written by 1 process(es), this run has 2: "
            "resume with --num_processes 1") in out, tail(out)
    assert fingerprint(checkpoint) == before


IMAGENET = ["data.dataset=imagenet", "data.generated_classes=3", "data.generated_size=8",
            "data.generated_val_size=2", "data.generated_image_px=40", "data.image_size=32", "data.batch_size=8",
            "data.eval_batch_size=6", "data.num_threads=1", "model.num_classes=3"]


def test_a_truncated_jpeg_met_in_training_stops_the_run_with_its_name(tmp_path):
    """An ImageNet-layout folder; the warm-up completes, then a training JPEG is cut in half."""
    run_dir, data_dir = tmp_path / "run", tmp_path / "imagenet"
    cmd = train_command(run_dir, data_dir, *IMAGENET, processes=1)
    run(cmd + ["--stage", "warmup"], tmp_path / "log", check=0)
    warmup = fingerprint(run_dir / "warmup" / "final")
    jpeg = sorted((data_dir / "train" / "n00000001").glob("*.JPEG"))[0]
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    code, out = run(cmd, tmp_path / "log")
    assert code == 2, tail(out)
    assert "error: DALI failed on a batch of epoch 0: Failed to decode sample" in out and str(jpeg) in out, tail(out)
    assert "python -m pipeline.check_data" in out
    assert fingerprint(run_dir / "warmup" / "final") == warmup
