import pytest
import torch

from svnr_fast.app import data, imageio


def write_images(folder, sizes, seed=0, channels=3):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, (H, W) in enumerate(sizes):
        path = folder / f"img{i}.png"
        imageio.write_image(path, torch.randint(0, 256, (channels, H, W), generator=g).float() / 255)
        paths.append(path)
    return paths


@pytest.fixture
def photos(tmp_path):
    return write_images(tmp_path / "photos", [(40, 50), (33, 64), (48, 48)])


def test_find_images_is_recursive_sorted_and_skips_hidden(tmp_path):
    write_images(tmp_path / "b", [(8, 8)])
    write_images(tmp_path / "a" / "deep", [(8, 8)])
    write_images(tmp_path / ".cache", [(8, 8)])
    (tmp_path / "notes.txt").write_text("not an image")
    found = data.find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/deep/img0.png", "b/img0.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.find_images(empty)
    with pytest.raises(FileNotFoundError, match="no folder"):
        data.find_images(tmp_path / "missing")


def test_batches_depend_only_on_seed_step_and_rank(photos):
    a = data.RandomCropBatches(photos, batch_size=6, crop=16, seed=3)
    b = data.RandomCropBatches(photos, batch_size=6, crop=16, seed=3, cache_bytes=1)   # evicts all the time
    assert a[5].shape == (6, 3, 16, 16) and a[5].dtype == torch.float32
    assert torch.equal(a[5], b[5]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[5], a[6])
    assert not torch.equal(a[5], data.RandomCropBatches(photos, 6, 16, seed=3, rank=1)[5])
    assert not torch.equal(a[5], data.RandomCropBatches(photos, 6, 16, seed=4)[5])


def test_crops_are_flipped_or_rotated_windows_of_the_images(photos):
    images = [data.load_rgb(p) for p in photos]
    batch = data.RandomCropBatches(photos, batch_size=16, crop=12, seed=0)[0]
    transforms_seen = set()
    for crop in batch:
        found = next((k for k in range(8) for image in images if _contains(image, data.dihedral(crop, _inverse(k)))),
                     None)
        assert found is not None, "a crop that is no transformed window of any image"
        transforms_seen.add(found)
    assert len(transforms_seen) > 3


def _inverse(k: int) -> int:
    return k if k >= 4 else (4 - k) % 4


def _contains(image, window) -> bool:
    c, h, w = window.shape
    patches = image.unfold(1, h, 1).unfold(2, w, 1)          # (3, H-h+1, W-w+1, h, w)
    return bool((patches == window[:, None, None]).all(dim=(0, 3, 4)).any())


def test_dihedral_gives_eight_distinct_transforms():
    x = torch.arange(9.0).reshape(1, 3, 3)
    results = {tuple(data.dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(results) == 8
    for k in range(8):
        assert torch.equal(data.dihedral(data.dihedral(x, k), _inverse(k)), x)


def test_gray_images_become_rgb_and_small_images_are_left_out(tmp_path):
    gray = write_images(tmp_path / "gray", [(30, 30)], channels=1)
    small = write_images(tmp_path / "small", [(10, 40)], seed=1)
    with pytest.warns(UserWarning, match="smaller than the 16x16 crop"):
        dataset = data.RandomCropBatches(gray + small, batch_size=2, crop=16)
    assert dataset.files == gray
    batch = dataset[0]
    assert torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2])
    with pytest.raises(ValueError, match="no image is at least 64x64"), pytest.warns(UserWarning):
        data.RandomCropBatches(gray + small, batch_size=2, crop=64)


def test_worker_pool_gives_the_same_batches_in_order(photos):
    dataset = data.RandomCropBatches(photos, batch_size=4, crop=16, seed=1)
    pooled = list(data.batch_loader(dataset, 3, 9, workers=2))
    assert len(pooled) == 6
    for step, batch in zip(range(3, 9), pooled):
        assert torch.equal(batch, dataset[step])


def test_heldout_crops_are_centred_and_multiples_of_8(tmp_path):
    paths = write_images(tmp_path, [(40, 70), (300, 20)])
    crops = data.heldout_crops(paths, size=32)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32), (3, 16, 16)]
    image = data.load_rgb(paths[0])
    assert torch.equal(crops[0], image[:, 4:36, 19:51])


def test_split_folder(tmp_path):
    assert data.split_folder(tmp_path) == (tmp_path, None)
    (tmp_path / "train").mkdir()
    (tmp_path / "heldout").mkdir()
    assert data.split_folder(tmp_path) == (tmp_path / "train", tmp_path / "heldout")
