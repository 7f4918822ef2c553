"""The model repository's parts that need no server: version policies, versions published whole by concurrent
exporters, and a full queue refusing requests before their bodies are decoded."""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mnist_dist.errors import UserError
from mnist_dist.inference.repository import publish_version, versions_in
from mnist_dist.serving.batching import Job, MicroBatcher, Overloaded
from mnist_dist.serving.repository import Policy
from mnist_dist.serving.sources import Source


@pytest.mark.parametrize("policy, chosen", [("latest:1", ["12"]), ("latest:2", ["3", "12"]), ("latest", ["12"]),
                                            ("all", ["1", "3", "12"]), ("specific:1,12,7", ["1", "12"]),
                                            ("specific:7", [])])
def test_version_policies_choose_as_tritons(policy, chosen):
    assert Policy(policy).choose(["1", "3", "12"]) == chosen  # versions sorted as numbers, not as text


@pytest.mark.parametrize("bad", ["newest", "latest:0", "latest:x", "specific:", "specific:a", "all:2"])
def test_a_bad_version_policy_is_one_line(bad):
    with pytest.raises(UserError, match="version policy"):
        Policy(bad)


def test_concurrent_exporters_each_publish_a_whole_version_of_their_own(tmp_path):
    model = tmp_path / "mnist"

    def export(i: int) -> str:
        staging = model / f".staging-{i}"
        staging.mkdir(parents=True)
        (staging / "manifest.json").write_text(str(i))
        return publish_version(staging, model).name

    with ThreadPoolExecutor(4) as pool:
        published = list(pool.map(export, range(12)))
    assert sorted(published, key=int) == [str(v) for v in range(1, 13)]
    assert versions_in(model) == [str(v) for v in range(1, 13)]  # and no staging folder is taken for one
    assert sorted((model / v / "manifest.json").read_text() for v in published) == sorted(map(str, range(12)))


class Counted(Job):
    """A request whose decoding is counted."""

    prepared = 0

    def prepare(self) -> np.ndarray:
        Counted.prepared += 1
        return np.zeros((1, 1, 28, 28), np.float32)

    def finish(self, logits):
        return logits.shape


def test_a_full_queue_refuses_before_decoding():
    """With the model busy and --max-queue 2, two requests wait and the next seven are refused without being
    decoded: a 503 costs no decode, and bodies waiting for one are bounded."""
    inside, release = threading.Event(), threading.Event()

    def run(batch):
        inside.set()
        release.wait(30)
        return (np.zeros((len(batch), 10), np.float32),)

    async def scenario():
        batcher = MicroBatcher(run, max_batch=1, max_queue=2)
        await batcher.start()
        first = asyncio.ensure_future(batcher(Counted()))
        await asyncio.to_thread(inside.wait, 30)
        later = [asyncio.ensure_future(batcher(Counted())) for _ in range(9)]
        await asyncio.sleep(0.2)
        decoded_while_busy = Counted.prepared
        release.set()
        answers = await asyncio.gather(first, *later, return_exceptions=True)
        await batcher.stop()
        return decoded_while_busy, answers

    Counted.prepared = 0
    decoded_while_busy, answers = asyncio.run(scenario())
    refused = [a for a in answers if isinstance(a, Overloaded)]
    assert decoded_while_busy == 1 and len(refused) == 7
    assert answers.count((1, 10)) == 3 and Counted.prepared == 3


def test_a_listing_takes_only_whole_versions_and_one_export_stays_one(tmp_path):
    repository = tmp_path / "models"
    for folder in ("mnist/1", "mnist/12", "mnist/.3.tmp", "mnist/4", "notes/1", "bad name/1"):
        (repository / folder).mkdir(parents=True)
    for version in ("mnist/1", "mnist/12", "mnist/.3.tmp", "bad name/1"):
        (repository / version / "manifest.json").write_text("{}")
    listing = Source(str(repository), "unused").listing()
    assert {name: list(versions) for name, versions in listing.items()} == {"mnist": ["1", "12"]}
    # mnist/4 has no manifest yet: a number claimed by an exporter that has not renamed its folder in
    export = repository / "mnist" / "1"
    single = Source(str(export), "digits")
    assert list(single.listing()) == ["digits"] and single.version_folder("digits", "1") == export
    (export / "manifest.json").unlink()  # export --force replacing the folder: for a moment, no manifest
    with pytest.raises(UserError, match=r"has no manifest\.json now"):
        single.listing()  # an error a poll waits out, not an empty repository whose models it would unload
