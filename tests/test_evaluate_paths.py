"""PathGroups (the paper's Fig. 8): images grouped by execution path, thumbnails de-normalised."""
import torch

from pipeline.evaluate import PathGroups

MEAN, STD = (125.0, 120.0, 110.0), (60.0, 62.0, 65.0)


def normalise(pixels):
    return (pixels.float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_groups_are_the_most_frequent_paths_with_their_own_images(tmp_path):
    # 10 images: 5 take path 110, 3 take 011, 2 take 000; each image's pixels hold its own index.
    paths = torch.tensor([[1, 1, 0]] * 5 + [[0, 1, 1]] * 3 + [[0, 0, 0]] * 2, dtype=torch.float32)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    pixels = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32)[order]
    groups = PathGroups(MEAN, STD, keep=7)
    groups.add(normalise(pixels[:4]), paths[order][:4])
    groups.add(normalise(pixels[4:]), paths[order][4:])  # only 3 more thumbnails are kept
    found = groups.groups(count=2, per_group=8)
    assert [(bits, n) for bits, n, _ in found] == [("110", 5), ("011", 3)]
    kept = order[:7]
    for bits, _, thumbs in found:
        expected = sorted(int(i) for i in kept if "".join(str(int(v)) for v in paths[i].tolist()) == bits)
        assert sorted(int(t[0, 0, 0]) for t in thumbs) == expected  # de-normalised back to the index
    groups.plot(tmp_path / "groups.png", "test", count=3, per_group=4)
    assert (tmp_path / "groups.png").stat().st_size > 1000


def test_large_images_are_shrunk_to_thumbnails():
    groups = PathGroups(MEAN, STD, side=32)
    groups.add(normalise(torch.full((2, 3, 224, 224), 200, dtype=torch.uint8)), torch.ones(2, 4))
    (_, n, thumbs), = groups.groups(count=1, per_group=2)
    assert n == 2 and thumbs.shape == (2, 3, 32, 32) and thumbs.dtype == torch.uint8
    assert int(thumbs.min()) >= 199 and int(thumbs.max()) <= 200
