"""Mid-epoch resume: a loader restored from state_dict() yields, bitwise, the batches an
uninterrupted loader yields for the rest of that epoch and the next one (augmentation included)."""
import pickle

import pytest
import torch

from pipeline.data import DataError, build_loader
from pipeline.data.generate import ensure_generated

CIFAR = {"dataset": "cifar10", "generated_size": 8, "generated_val_size": 3}  # 80 train: 10 batches of 8 (5 per rank)
DATASETS = {
    # batches per DALI iteration: automatic (the whole epoch in one), one, three (the last has one)
    "cifar10": CIFAR,
    "cifar10-run1": {**CIFAR, "batches_per_run": 1},
    "cifar10-run3": {**CIFAR, "batches_per_run": 3},
    "imagenet": {"dataset": "imagenet", "generated_classes": 4, "generated_size": 6, "generated_val_size": 3,
                 "generated_image_px": 48, "image_size": 24},  # 24 train: 3 batches (1 per rank of 2)
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def data_cfg(request, tmp_path_factory):
    cfg = {"root": str(tmp_path_factory.mktemp(request.param)), "generate": True,
           "batch_size": 8, "eval_batch_size": 8, "num_threads": 2, "prefetch": 3, **DATASETS[request.param]}
    ensure_generated(cfg)
    return cfg


def epochs(loader, count):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(count)]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def consume(loader, count):
    iterator = iter(loader)
    for _ in range(count):
        next(iterator)
    return iterator


@pytest.mark.parametrize("split", ["train", "val"])
def test_resume_matches_uninterrupted_run(data_cfg, split):
    reference = epochs(build_loader(data_cfg, split, seed=5), 3)
    batches = len(reference[0])
    # from inside epoch 0 (at and between DALI iterations of 3 batches), its last batch (the state
    # then describes epoch 1's start) and epoch 1
    for epoch, done in [(0, 0), (0, 1), (0, 3), (0, 4), (0, batches - 1), (0, batches), (1, 1)]:
        if done > batches:
            continue
        interrupted = build_loader(data_cfg, split, seed=5)
        epochs(interrupted, epoch)
        rest_of_interrupted = consume(interrupted, done)
        state = pickle.loads(pickle.dumps(interrupted.state_dict()))
        if done == batches:
            assert (state["epoch"], state["position"]) == (epoch + 1, 0)
        else:
            assert (state["epoch"], state["position"]) == (epoch, done)

        resumed = build_loader(data_cfg, split, seed=5)
        resumed.load_state_dict(state)
        assert resumed.epoch == state["epoch"]
        expected = reference[epoch][done:]  # empty when the state is at the epoch's end
        if expected:
            assert_same([(x.clone(), y.clone()) for x, y in resumed], expected)
        assert_same(epochs(resumed, 1)[0], reference[epoch + 1])
        # taking the state did not disturb the interrupted loader itself
        assert_same([(x.clone(), y.clone()) for x, y in rest_of_interrupted], expected)


def test_resume_on_the_second_rank(data_cfg):
    stream = sum(epochs(build_loader(data_cfg, "train", shard_id=1, num_shards=2, seed=3), 3), [])
    interrupted = build_loader(data_cfg, "train", shard_id=1, num_shards=2, seed=3)
    consume(interrupted, 1)
    resumed = build_loader(data_cfg, "train", shard_id=1, num_shards=2, seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    got = sum(epochs(resumed, 2), [])  # the rest of the epoch (none if 1 batch was all), the next
    assert len(got) == (len(resumed) - 1 or len(resumed)) + len(resumed)
    assert_same(got, stream[1:1 + len(got)])


def test_state_from_another_layout_is_refused(data_cfg):
    state = build_loader(data_cfg, "train").state_dict()
    other = build_loader({**data_cfg, "batch_size": 4}, "train")
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(state)


def test_state_from_another_grouping_is_refused(data_cfg):
    if data_cfg["dataset"] == "imagenet":
        pytest.skip("batches_per_run is CIFAR's")
    state = build_loader(data_cfg, "train").state_dict()
    other = build_loader({**data_cfg, "batches_per_run": 2}, "train")
    with pytest.raises(DataError, match="batches_per_run"):
        other.load_state_dict(state)


def test_state_from_another_pipeline_is_refused_clearly(data_cfg):
    """DALI's part of the state comes from another pipeline (here: the train split's, restored into
    the val loader); the error says so, instead of pointing at the dataset's files."""
    val = build_loader(data_cfg, "val")
    state = {**val.state_dict(), "dali": build_loader(data_cfg, "train").state_dict()["dali"]}
    with pytest.raises(DataError, match="does not fit this data pipeline"):
        val.load_state_dict(state)
