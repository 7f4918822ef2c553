import shutil

import pytest
import torch

from mnist_dist import data
from mnist_dist.errors import UserError

from conftest import train_job


@pytest.fixture
def data_copy(mnist_root, tmp_path):
    """A writable copy of the MNIST root, for corrupting."""
    shutil.copytree(mnist_root / "MNIST", tmp_path / "MNIST")
    return tmp_path


def test_loads_real_mnist_as_uint8(mnist_root):
    images, labels = data.load_split(mnist_root, "test", download=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and set(labels.tolist()) == set(range(10))
    train_images, _ = data.load_split(mnist_root, "train", download=False)
    assert train_images.shape == (60_000, 28, 28)


def test_batches_are_scaled_exactly_like_totensor(mnist_root):
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    tutorial = datasets.MNIST(str(mnist_root), train=False, transform=ToTensor())
    batches = data.TensorBatches(*data.load_split(mnist_root, "test", download=False))
    images, labels = batches.__getitems__([0, 1, 9999])
    for row, index in enumerate([0, 1, 9999]):
        image, label = tutorial[index]
        assert torch.equal(images[row], image) and labels[row] == label


def test_env_var_points_at_the_data(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path
    assert data.resolve_data_dir("elsewhere") == data.resolve_data_dir("elsewhere")  # the option wins
    assert str(data.resolve_data_dir("elsewhere")) == "elsewhere"


def test_missing_dir_without_download_says_how_to_supply(tmp_path):
    with pytest.raises(UserError, match="MNIST not found.*--data-dir"):
        data.load_split(tmp_path / "absent", "test", download=False)


def test_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):  # what torchvision raises when every mirror is unreachable
        (tmp_path / "absent" / "MNIST" / "raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(UserError, match="MNIST_DATA_DIR"):
        data.load_split(tmp_path / "absent", "test", True)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("damage", ["truncate", "bad_magic", "wrong_count"])
def test_corrupt_idx_is_rejected(data_copy, damage):
    path = data.raw_folder(data_copy) / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "bad_magic":
        raw[3] = 0xFF
    else:
        raw[7] = 0x01  # item count field no longer 10,000
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        data.load_split(data_copy, "test", download=False)


def test_corrupt_labels_are_rejected(data_copy):
    path = data.raw_folder(data_copy) / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[8 + 5] = 42
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="labels .* corrupt"):
        data.load_split(data_copy, "test", download=False)


def test_train_job_reports_corrupt_data_in_one_line(data_copy, tmp_path):
    path = data.raw_folder(data_copy) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    proc = train_job("--data-dir", data_copy, "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "train-images-idx3-ubyte is corrupt or truncated" in error_lines[0]
    assert not (tmp_path / "out").exists()


def shard_indices(dataset_size, batch_size, num_processes, epoch, seed=0):
    """Which sample indices each process trains on in one epoch."""
    dataset = data.TensorBatches(torch.zeros(dataset_size, 28, 28, dtype=torch.uint8), torch.arange(dataset_size))
    shards = []
    for rank in range(num_processes):
        batches = data.ShardedBatches(dataset, batch_size, num_processes, rank, seed)
        batches.set_epoch(epoch)
        assert all(len(labels) == batch_size for _, labels in batches)
        shards.append(torch.cat([labels for _, labels in batches]).tolist())
    return shards


def test_processes_train_on_disjoint_shards_that_cover_the_data():
    size, batch = 1000, 64  # 1000 = 7 global batches of 128, plus 104 images
    shards = shard_indices(size, batch, num_processes=2, epoch=3)
    assert len(shards[0]) == len(shards[1]) == 512  # the last global batch is padded to full size
    assert set(shards[0]) | set(shards[1]) == set(range(size))
    # Only the 24 padding samples of the last batch repeat; every real sample is seen by one process.
    assert len(set(shards[0][:448]) & set(shards[1][:448])) == 0
    assert len(shards[0]) + len(shards[1]) - size == 24


def test_shuffle_changes_per_epoch_and_repeats_per_seed():
    first, again, later = (shard_indices(1000, 64, 2, epoch) for epoch in (1, 1, 2))
    assert first == again
    assert first != later
    assert shard_indices(1000, 64, 2, 1, seed=1) != first


def test_one_process_sees_every_image_once_per_epoch():
    (shard,) = shard_indices(60_000, 128, 1, epoch=1)
    assert len(shard) == 469 * 128 and set(shard) == set(range(60_000))  # 32 padding repeats at the end
