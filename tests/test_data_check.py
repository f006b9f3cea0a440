"""The preflight check: check_dataset() and `python -m pipeline.check_data` in a subprocess."""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.check import check_dataset
from pipeline.data.generate import ensure_generated

REPO = Path(__file__).resolve().parents[1]
SMALL = {"generated_classes": 3, "generated_size": 4, "generated_val_size": 2, "generated_image_px": 48}


@pytest.fixture(scope="module")
def imagenet_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inet"))
    ensure_generated({"dataset": "imagenet", "root": root, "generate": True, **SMALL})
    return root


@pytest.fixture
def imagenet_root(imagenet_source, tmp_path):
    shutil.copytree(imagenet_source, tmp_path / "i")
    return str(tmp_path / "i")


def files_in(root, split, wnid):
    folder = os.path.join(root, split, wnid)
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))]


def damage_imagenet(root):
    """One of each kind of bad and odd file; returns (bad paths, noted paths)."""
    train0, train1, val2 = files_in(root, "train", "n00000000"), files_in(root, "train", "n00000001"), \
        files_in(root, "val", "n00000002")
    data = open(train0[0], "rb").read()
    open(train0[0], "wb").write(data[: len(data) // 2])  # truncated
    open(train0[1], "wb").write(data[:300] + bytes(255 - b for b in data[300:]))  # corrupt
    open(train1[0], "wb").write(b"")  # empty
    open(train1[1], "wb").write(b"<html>404 not found</html>")  # not an image
    Image.open(train1[2]).convert("L").save(train1[2], "JPEG")  # grayscale: fine
    Image.open(train1[3]).convert("CMYK").save(train1[3], "JPEG")  # CMYK: fine
    Image.open(val2[0]).save(val2[0], "PNG")  # PNG named .JPEG: a note
    readme = os.path.join(root, "train", "n00000002", "readme.txt")
    open(readme, "w").write("not a sample")  # a note: left out of the samples
    os.makedirs(os.path.join(root, "train", "n00000007"))  # empty class folder
    os.makedirs(os.path.join(root, "val", "n00000009"))  # val class missing from train
    Image.new("RGB", (8, 8)).save(os.path.join(root, "val", "n00000009", "a.JPEG"))
    bad = [train0[0], train0[1], train1[0], train1[1], os.path.join(root, "train", "n00000007"),
           os.path.join(root, "val", "n00000009")]
    return bad, [readme, val2[0]]


def write_job(tmp_path, dataset):
    job = tmp_path / "job.yaml"
    job.write_text(f"job: check-test\ndata:\n  dataset: {dataset}\n")
    return str(job)


def run_check(job, root, *extra):
    return subprocess.run([sys.executable, "-m", "pipeline.check_data", "--job", job, "--set", f"data.root={root}",
                           "--workers", "2", *extra], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_good_imagenet_passes(imagenet_source):
    report = check_dataset({"dataset": "imagenet", "root": imagenet_source}, workers=2)
    assert report.problems == [] and report.notes == [] and report.samples == 18


def test_every_bad_imagenet_file_is_listed(imagenet_root):
    bad, noted = damage_imagenet(imagenet_root)
    report = check_dataset({"dataset": "imagenet", "root": imagenet_root}, workers=2)
    listed = [problem.split(": ")[0] for problem in report.problems]
    assert sorted(listed) == sorted(bad)
    assert [note.split(": ")[0] for note in report.notes] == noted
    assert "not an image file name" in report.notes[0] and "PNG data named .JPEG" in report.notes[1]


def test_missing_root_and_split(tmp_path, imagenet_root):
    report = check_dataset({"dataset": "imagenet", "root": str(tmp_path / "none")})
    assert len(report.problems) == 1 and "data.root not found" in report.problems[0]
    shutil.rmtree(os.path.join(imagenet_root, "val"))
    report = check_dataset({"dataset": "imagenet", "root": imagenet_root})
    assert [p.split(": ")[0] for p in report.problems] == [os.path.join(imagenet_root, "val")]


def test_bad_cifar_files_are_all_listed(tmp_path):
    root = str(tmp_path)
    ensure_generated({"dataset": "cifar10", "root": root, "generate": True, "generated_size": 4,
                      "generated_val_size": 2})
    folder = os.path.join(root, "cifar-10-batches-py")
    assert check_dataset({"dataset": "cifar10", "root": root}).problems == []
    open(os.path.join(folder, "data_batch_2"), "wb").write(b"garbage")
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": [1, 2, 3], "labels": [0]}, f)
    os.remove(os.path.join(folder, "data_batch_5"))
    report = check_dataset({"dataset": "cifar10", "root": root})
    assert [p.split(": ")[0] for p in report.problems] == [
        os.path.join(folder, n) for n in ("data_batch_2", "data_batch_5", "test_batch")]


def test_cli_lists_bad_files_and_fails(tmp_path, imagenet_root):
    bad, noted = damage_imagenet(imagenet_root)
    result = run_check(write_job(tmp_path, "imagenet"), imagenet_root)
    assert result.returncode == 1, result.stdout + result.stderr
    for path in bad:
        assert f"bad: {path}: " in result.stdout
    for path in noted:
        assert f"note: {path}: " in result.stdout
    assert "FAILED: 6 problem(s), 2 note(s)" in result.stdout


def test_cli_passes_good_data_with_one_line(tmp_path, imagenet_source):
    result = run_check(write_job(tmp_path, "imagenet"), imagenet_source)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines() == [f"OK: 18 images in imagenet at {imagenet_source}, "
                                                  "no problems (0 note(s))"]


@pytest.mark.slow  # several CLI processes: ~4 s
def test_cli_strict_fails_on_notes_and_reports_config_errors(tmp_path, imagenet_root):
    Image.open(files_in(imagenet_root, "val", "n00000000")[0]).save(
        files_in(imagenet_root, "val", "n00000000")[0], "PNG")
    job = write_job(tmp_path, "imagenet")
    assert run_check(job, imagenet_root).returncode == 0
    assert run_check(job, imagenet_root, "--strict").returncode == 1
    result = run_check(job, imagenet_root, "--set", "data.holdout=3")
    assert result.returncode == 2 and "holdout applies to CIFAR only" in result.stdout


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cli_on_missing_cifar_prints_the_download_command(tmp_path, dataset):
    import torchvision
    from pipeline.data.cifar import LAYOUT, TORCHVISION_CLASS
    folder = LAYOUT[dataset][0]
    torchvision_class = getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])
    assert torchvision_class.base_folder == folder  # what it downloads is the folder the loader reads
    job, root = write_job(tmp_path, dataset), tmp_path / "data"
    result = run_check(job, root)
    assert result.returncode == 1, result.stdout + result.stderr
    download = (f"python -c \"import torchvision; "
                f"torchvision.datasets.{TORCHVISION_CLASS[dataset]}('{root}', download=True)\"")
    assert result.stdout.startswith(f"bad: {root / folder}: not found; ") and download in result.stdout
    # data.root set to the layout's folder itself: the fix is its parent
    result = run_check(job, root / folder)
    assert result.returncode == 1 and f"set data.root={root}, the folder that holds it" in result.stdout


def test_cli_on_missing_imagenet_prints_the_layout_and_how_to_make_it(tmp_path):
    root = tmp_path / "archives"
    root.mkdir()  # the official archives would be here, not yet unpacked
    result = run_check(write_job(tmp_path, "imagenet"), root)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"bad: {root / 'train'}: split folder missing; " in result.stdout
    for fix in ("<root>/train/<wnid>/*.JPEG", "ILSVRC2012_devkit_t12.tar.gz",
                f"torchvision.datasets.ImageNet('{root}', split=s) for s in ('train', 'val')"):
        assert fix in result.stdout, result.stdout


def test_the_old_command_names_the_new_one():
    """`python -m pipeline.data.check` (the command's first home) must not pass silently."""
    old = subprocess.run([sys.executable, "-m", "pipeline.data.check", "--job", "job.yaml"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and "python -m pipeline.check_data" in old.stderr
