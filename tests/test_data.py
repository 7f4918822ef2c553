import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mnist_dist.data import batches, mnist
from mnist_dist.errors import UserError

from conftest import ROOT, train_job

# md5 sums of the four original, uncompressed MNIST IDX files, as widely published for the dataset.
PUBLISHED_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


@pytest.fixture
def data_copy(mnist_root, tmp_path):
    """A writable copy of the MNIST root, for corrupting."""
    shutil.copytree(mnist_root / "MNIST", tmp_path / "MNIST")
    return tmp_path


def test_bundled_copy_is_the_published_mnist():
    for name, md5 in PUBLISHED_MD5.items():
        assert hashlib.md5(mnist.read_bundled(name)).hexdigest() == md5, name


def test_loads_the_bundled_mnist_as_uint8():
    images, labels = mnist.load_split("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    train_images, train_labels = mnist.load_split("train")
    assert train_images.shape == (60_000, 28, 28) and train_labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_batches_are_scaled_exactly_like_totensor(mnist_root):
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    tutorial = datasets.MNIST(str(mnist_root), train=False, transform=ToTensor())  # torchvision's own IDX reader
    test_set = batches.TensorBatches(*mnist.load_split("test"))
    images, labels = test_set.__getitems__([0, 1, 9999])
    for row, index in enumerate([0, 1, 9999]):
        image, label = tutorial[index]
        assert torch.equal(images[row], image) and labels[row] == label


def test_data_source_order(monkeypatch, tmp_path, mnist_root):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    assert mnist.find_source() == mnist.Source(None, "bundled")
    (tmp_path / "data").mkdir()
    assert mnist.find_source().chosen_by == "bundled"  # an empty ./data is not MNIST
    shutil.copytree(mnist_root / "MNIST", tmp_path / "data" / "MNIST")
    assert mnist.find_source() == mnist.Source(Path("data"), "./data")
    monkeypatch.setenv(mnist.DATA_DIR_ENV, str(tmp_path / "env"))
    assert mnist.find_source() == mnist.Source(tmp_path / "env", "$MNIST_DATA_DIR")
    assert mnist.find_source("given") == mnist.Source(Path("given"), "--data-dir")


def test_a_damaged_bundled_file_is_refused(monkeypatch):
    sums = dict(mnist.bundled_sums(), **{"t10k-labels-idx1-ubyte.gz": "0" * 64})
    monkeypatch.setattr(mnist, "bundled_sums", lambda: sums)
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz fails its sha256 check"):
        mnist.load_split("test")


def test_missing_dir_without_download_says_how_to_supply(tmp_path):
    with pytest.raises(UserError, match=r"MNIST not found.*--data-dir"):
        mnist.load_split("test", tmp_path / "absent", download=False)


def test_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(self):  # what torchvision raises when every mirror is unreachable
        (tmp_path / "absent" / "MNIST" / "raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets.MNIST, "download", offline)
    with pytest.raises(UserError, match="MNIST_DATA_DIR"):
        mnist.load_split("test", tmp_path / "absent", True)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("damage", ["truncate", "bad_magic", "wrong_count"])
def test_corrupt_idx_is_rejected(data_copy, damage):
    path = mnist.raw_folder(data_copy) / "t10k-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "bad_magic":
        raw[3] = 0xFF
    else:
        raw[7] = 0x01  # item count field no longer 10,000
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte"):
        mnist.load_split("test", data_copy, download=False)


def test_corrupt_labels_are_rejected(data_copy):
    path = mnist.raw_folder(data_copy) / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[8 + 5] = 42
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"labels .* corrupt"):
        mnist.load_split("test", data_copy, download=False)


@pytest.mark.slow  # trains
def test_train_job_reports_corrupt_data_in_one_line(data_copy, tmp_path):
    path = mnist.raw_folder(data_copy) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    proc = train_job("--data-dir", data_copy, "--output-dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "train-images-idx3-ubyte is corrupt or truncated" in error_lines[0]
    assert not (tmp_path / "out").exists()


def shard_indices(dataset_size, batch_size, num_processes, epoch, seed=0):
    """Which sample indices each process trains on in one epoch."""
    dataset = batches.TensorBatches(torch.zeros(dataset_size, 28, 28, dtype=torch.uint8), torch.arange(dataset_size))
    shards = []
    for rank in range(num_processes):
        loader = batches.ShardedBatches(dataset, batch_size, num_processes, rank, seed)
        loader.set_epoch(epoch)
        assert all(len(labels) == batch_size for _, labels in loader)
        shards.append(torch.cat([labels for _, labels in loader]).tolist())
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


@pytest.mark.slow  # builds a wheel
def test_a_built_wheel_carries_the_bundled_mnist(tmp_path):
    # From a copy without the editable install's egg-info, whose file list would otherwise smuggle the data in.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__",
                                                                  ".pytest_cache", "runs", "artifacts"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path,
                    source], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mnist_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {f"mnist_dist/data/bundled/{name}.gz" for name in PUBLISHED_MD5} | {
        "mnist_dist/data/bundled/SHA256SUMS", "mnist_dist/data/bundled/README.md"}
    assert bundled <= names
