"""predict on users' files: every input gets a row, bad ones an error, in order; bad commands one line."""
import csv
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from mnist_dist.data import mnist
from mnist_dist.inference import images, predict
from mnist_dist.inference import manifest as manifest_lib
from mnist_dist.inference.models import open_model

from conftest import png_bytes, run, write_test_pngs

CLI = [sys.executable, "-m", "mnist_dist.cli"]


@pytest.fixture(scope="module")
def test_digits():
    pixels, labels = mnist.load_split("test")
    return pixels.numpy(), labels.numpy()


def test_predict_on_pngs_agrees_label_for_label_with_bench(exported_model, test_digits, tmp_path):
    pixels, labels = test_digits
    write_test_pngs(tmp_path / "pngs", 300)
    out = tmp_path / "preds.csv"
    proc = run([*CLI, "predict", tmp_path / "pngs", "--model", exported_model / "model.onnx", "--out", out])
    rows = list(csv.DictReader(out.open()))
    assert [r["input"] for r in rows] == [str(tmp_path / "pngs" / f"digit_{i:04d}.png") for i in range(300)]
    predicted = np.array([int(r["prediction"]) for r in rows])
    # bench's path: the test tensors through the same ONNX model, scaled by the manifest's contract
    manifest = json.loads((exported_model / "manifest.json").read_text())
    x = pixels[:300, None].astype(np.float32) * np.float32(manifest["input"]["scale"])
    assert predicted.tolist() == open_model(exported_model / "model.onnx", "onnxruntime")(x).argmax(1).tolist()
    assert (predicted == labels[:300]).mean() > 0.95
    assert all(r["error"] == "" and 0 < float(r["confidence"]) <= 1 and len(r["top3"].split()) == 3 for r in rows)
    assert "300 inputs, 0 failed" in proc.stderr and "images/s" in proc.stderr


def test_bad_files_cost_only_their_own_row(exported_model, test_digits, tmp_path):
    pixels, _labels = test_digits
    folder = tmp_path / "mixed"
    write_test_pngs(folder, 4)  # digit_0000..0003: good
    Image.fromarray(pixels[0]).save(folder / "b_corrupt.png")
    raw = (folder / "b_corrupt.png").read_bytes()
    (folder / "b_corrupt.png").write_bytes(raw[:20] + b"\x00" * 40 + raw[60:])
    big = np.kron(pixels[1], np.ones((4, 4), np.uint8))  # a 112x112 digit
    Image.fromarray(255 - big).convert("RGB").save(folder / "c_truncated.jpg", quality=95)
    (folder / "c_truncated.jpg").write_bytes((folder / "c_truncated.jpg").read_bytes()[:600])
    (folder / "d_text.png").write_text("this is not an image")
    out = tmp_path / "preds.json"
    proc = run([*CLI, "predict", folder, "--model", exported_model / "model.onnx", "--out", out], check=False)
    assert proc.returncode == 0  # bad records are rows, Spark's PERMISSIVE: the job itself succeeded
    assert "7 inputs, 3 failed" in proc.stderr and "Traceback" not in proc.stderr
    assert "3 of 7 inputs failed; their rows say why" in proc.stderr
    rows = {r["input"].rsplit("/", 1)[1]: r for r in json.loads(out.read_text())}
    for name in ("b_corrupt.png", "c_truncated.jpg", "d_text.png"):
        assert rows[name]["error"] and rows[name]["prediction"] is None
    for i in range(4):
        row = rows[f"digit_{i:04d}.png"]
        assert row["error"] == "" and row["prediction"] == predict_one(exported_model, pixels[i])


def test_max_failed_is_a_count_or_a_fraction_of_the_inputs(exported_model, test_digits, tmp_path):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    np.save(tmp_path / "digits.npy", test_digits[0][:7])
    for i in range(3):
        (tmp_path / f"broken{i}.png").write_bytes(b"not an image")
    inputs = [str(tmp_path / "digits.npy"), *(str(tmp_path / f"broken{i}.png") for i in range(3))]  # 3 of 10 fail
    codes = {}
    for limit in ("0", "2", "3", "0.25", "0.3", "none"):
        extra = [] if limit == "none" else ["--max-failed", limit]
        result = CliRunner().invoke(main, ["predict", *inputs, "--model", str(exported_model / "model.onnx"),
                                           "--out", str(tmp_path / "p.csv"), *extra])
        codes[limit] = result.exit_code
        assert (tmp_path / "p.csv").exists() and "3 of 10 inputs failed; their rows say why" in result.output
        (tmp_path / "p.csv").unlink()  # written before the verdict, whatever it is
    assert codes == {"0": 2, "2": 2, "3": 0, "0.25": 2, "0.3": 0, "none": 0}
    for bad in ("-1", "1.5", "some"):
        result = CliRunner().invoke(main, ["predict", *inputs, "--model", str(exported_model / "model.onnx"),
                                           "--max-failed", bad])
        assert result.exit_code == 1 and result.output.count("Error:") == 1 and "--max-failed must be" in result.output


def predict_one(model_dir, pixels):
    model = open_model(model_dir / "model.onnx", "onnxruntime")
    return int(model.run(pixels[None, None].astype(np.float32) * np.float32(model.manifest["input"]["scale"])).argmax())


def test_rgb_odd_size_and_dark_on_light_images_are_made_mnist_like(exported_model, test_digits, tmp_path):
    pixels, labels = test_digits
    model = open_model(exported_model / "model.onnx", "onnxruntime")
    x = pixels[:100, None].astype(np.float32) * np.float32(model.manifest["input"]["scale"])
    probabilities = manifest_lib.probabilities(model.run(x), model.manifest)
    confident = [i for i, p in enumerate(probabilities) if p.max() > 0.999 and p.argmax() == labels[i]]
    files, truth = [], []
    for i in confident[:8]:
        digit = Image.fromarray(pixels[i])
        variants = {
            "rgb": digit.convert("RGB").resize((84, 84), Image.BICUBIC),  # as a phone photo would be
            "dark_on_light": Image.fromarray(255 - np.asarray(digit.resize((200, 200), Image.BICUBIC))),
        }
        wide = Image.new("L", (100, 60))  # 100x60, the digit off-centre on a black canvas
        wide.paste(digit.resize((50, 50)), (40, 5))
        variants["100x60"] = wide
        for name, img in variants.items():
            files.append(tmp_path / f"{i}_{name}.png")
            img.save(files[-1])
            truth.append(int(labels[i]))
    rows, summary = predict.predict(files, exported_model / "model.onnx", show_progress=False)
    assert summary["failed"] == 0 and len(rows) == 24
    right = sum(r["prediction"] == t for r, t in zip(rows, truth))
    # Re-cropping and re-centring changes a digit a little, so allow one miss in 24.
    assert right >= 23, [(r["input"], r["prediction"], t) for r, t in zip(rows, truth) if r["prediction"] != t]


def test_prepared_images_look_like_mnist():
    canvas = np.full((60, 100), 255, np.float32)  # dark-on-light 100x60
    canvas[10:50, 20:30] = 0  # a tall bar: a "1"
    out = images.to_mnist(canvas, "auto", (28, 28), 20)
    assert out.shape == (28, 28) and out[0].max() == 0 and out.max() > 200  # white on black
    rows, _cols = np.nonzero(out > 0.2 * out.max())
    assert rows.max() - rows.min() + 1 <= 20 and rows.max() - rows.min() + 1 >= 18  # fitted in 20x20
    mass = np.indices(out.shape).reshape(2, -1) @ out.ravel() / out.sum()
    assert np.allclose(mass, 13.5, atol=1.0)  # centred by mass
    blank = np.zeros((28, 28), np.float32)
    assert np.array_equal(images.to_mnist(blank, "auto", (28, 28), 20), blank)  # 28x28 taken as is
    assert images.to_mnist(np.zeros((28, 28), np.float32), "yes", (28, 28), 20).max() == 255


def test_the_border_median_is_numpys_median():
    """The polarity rule's median (a sort, for speed) is numpy's, odd and even lengths, ties and stacks alike."""
    rng = np.random.default_rng(0)
    for shape in [(108,), (3, 108), (4, 109), (1,), (2,)]:
        for dtype in (np.float32, np.float64):
            values = (rng.random(shape) * 255).astype(dtype)
            values[..., : shape[-1] // 2] = 127.5  # ties across the middle
            assert np.array_equal(images.median(values), np.median(values, axis=-1)), (shape, dtype)
    light, dark = np.full((28, 28), 200, np.float32), np.full((28, 28), 50, np.float32)
    assert images.light_background(light) and not images.light_background(dark)
    assert list(images.light_background(np.stack([light, dark]))) == [True, False]


def test_gray_pngs_read_exactly_as_pillow_reads_them(test_digits):
    """Plain 8-bit gray PNGs are decoded by libspng, others by Pillow: the pixels are Pillow's either way."""
    pixels, _ = test_digits
    wide = np.kron(pixels[1], np.ones((3, 5), np.uint8))[:-1]  # 83x140: not the model's size
    for digit in [*pixels[:200], wide, 255 - wide]:
        for options in ({}, {"optimize": True}, {"compress_level": 0}):
            data = png_bytes(digit, **options)
            expected = np.asarray(Image.open(io.BytesIO(data)), np.float32)
            assert np.array_equal(images.open_grayscale(data), expected)
    # A gray PNG with an EXIF orientation is read upright, as phones' JPEGs are.
    exif = Image.Exif()
    exif[0x0112] = 6  # turn a quarter clockwise to view
    stored = png_bytes(wide, exif=exif)
    assert np.array_equal(images.open_grayscale(stored), np.rot90(wide, -1))
    # Broken pixel data is one image's error, in Pillow's words.
    good = png_bytes(pixels[0], compress_level=0)
    start = good.index(b"IDAT") + 4
    broken = good[:start] + bytes([0x78, 0x01, 0xFF]) + good[start + 3 :]
    with pytest.raises(images.BadImage, match="not a readable image"):
        images.open_grayscale(broken)


def test_npy_and_idx_inputs(exported_model, test_digits, mnist_root, tmp_path):
    pixels, labels = test_digits
    np.save(tmp_path / "u8.npy", pixels[:5])
    np.save(tmp_path / "f.npy", pixels[5:8, None].astype(np.float64) / 255)
    idx = mnist.raw_folder(mnist_root) / "t10k-images-idx3-ubyte"
    rows, _summary = predict.predict([tmp_path / "u8.npy", tmp_path / "f.npy"], exported_model / "model.onnx",
                                    show_progress=False)
    assert [r["input"] for r in rows] == [f"{tmp_path / 'u8.npy'}#{i}" for i in range(5)] + \
        [f"{tmp_path / 'f.npy'}#{i}" for i in range(3)]
    assert [r["prediction"] for r in rows] == [predict_one(exported_model, p) for p in pixels[:8]]
    idx_rows, _ = predict.predict([idx], exported_model / "model.onnx", show_progress=False)
    assert len(idx_rows) == 10_000 and idx_rows[7]["input"].endswith("#7")
    assert np.mean([r["prediction"] == label for r, label in zip(idx_rows, labels)]) > 0.95


def test_truncated_arrays_cost_only_their_own_row(exported_model, test_digits, mnist_root, tmp_path):
    pixels, _ = test_digits
    np.save(tmp_path / "good.npy", pixels[:3])
    (tmp_path / "cut.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:-100])
    idx = (mnist.raw_folder(mnist_root) / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "cut-idx3-ubyte").write_bytes(idx[: 16 + 28 * 28 * 5 + 7])
    rows, summary = predict.predict([tmp_path / "good.npy", tmp_path / "cut.npy", tmp_path / "cut-idx3-ubyte"],
                                    exported_model / "model.onnx", show_progress=False)
    assert (summary["inputs"], summary["failed"]) == (5, 2)
    assert [r["error"] == "" for r in rows] == [True, True, True, False, False]
    assert "not a readable .npy file" in rows[3]["error"] and "truncated" in rows[4]["error"]


def test_float_rows_outside_0_1_get_their_own_error_row(exported_model, tmp_path):
    rows = np.random.default_rng(0).random((4, 28, 28))
    rows[1, 3, 3], rows[3, 0, 0] = 1.5, np.nan
    np.save(tmp_path / "f.npy", rows)
    result, summary = predict.predict([tmp_path / "f.npy"], exported_model / "model.onnx", show_progress=False)
    assert [r["error"] for r in result] == ["", "values outside [0, 1]", "", "values outside [0, 1]"]
    assert summary["failed"] == 2


def test_int8_and_torchscript_models_predict_too(exported_model, test_digits, tmp_path):
    pixels, labels = test_digits
    np.save(tmp_path / "x.npy", pixels[:64])
    for name in ("model.int8.onnx", "model.ts"):
        rows, _ = predict.predict([tmp_path / "x.npy"], exported_model / name, show_progress=False)
        assert np.mean([r["prediction"] == label for r, label in zip(rows, labels[:64])]) > 0.9, name


def command_error(args):
    proc = run([*CLI, "predict", *args], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode not in (0, 2) and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_command_level_errors_are_one_line(exported_model, tmp_path):
    model = exported_model / "model.onnx"
    (tmp_path / "empty").mkdir()
    assert "holds no images" in command_error([tmp_path / "empty", "--model", model])
    assert "no inputs" in command_error(["--model", model])
    assert "does not exist" in command_error([tmp_path, "--model", tmp_path / "nope.onnx"])
    np.save(tmp_path / "big.npy", np.zeros((5, 32, 32), np.uint8))
    assert "expected (N,28,28)" in command_error([tmp_path / "big.npy", "--model", model])
    np.save(tmp_path / "ints.npy", np.zeros((5, 28, 28), np.int64))
    assert "dtype int64" in command_error([tmp_path / "ints.npy", "--model", model])


def test_corrupt_or_foreign_models_are_refused(exported_model, tmp_path):
    import shutil

    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "models"
    shutil.copytree(exported_model, folder)
    (folder / "model.onnx").write_bytes((folder / "model.onnx").read_bytes()[:5000])
    assert "differs from the file recorded in its manifest" in command_error(
        [tmp_path / "models", "--model", folder / "model.onnx"])
    record_in_manifest(folder, "model.onnx")  # as if exported so: the runtime itself must refuse it
    for runtime in ("onnxruntime", "openvino"):
        assert "cannot load" in command_error([tmp_path / "models", "--model", folder / "model.onnx",
                                               "--runtime", runtime])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 32, 32])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    record_in_manifest(folder, "model.onnx")
    for runtime in ("onnxruntime", "openvino"):  # the input shape as each engine declares it
        assert "expected [batch, 1, 28, 28]" in command_error([tmp_path / "models", "--model", folder / "model.onnx",
                                                              "--runtime", runtime])


def record_in_manifest(folder, name):
    manifest = manifest_lib.load(folder)
    manifest["files"][name] = manifest_lib.describe_file(folder / name)
    (folder / manifest_lib.MANIFEST).write_text(json.dumps(manifest))


def confident_digits(exported_model, test_digits, count: int) -> list:
    """Indices of test digits the model reads right with near certainty: any miss below is the input's handling."""
    pixels, labels = test_digits
    model = open_model(exported_model / "model.onnx", "onnxruntime")
    probabilities = manifest_lib.probabilities(model.run(pixels[:200, None].astype(np.float32) / 255), model.manifest)
    return [i for i, p in enumerate(probabilities) if p.max() > 0.999 and p.argmax() == labels[i]][:count]


def exif_rotated_jpeg(digit: np.ndarray, path) -> None:
    """Stored a quarter turn anticlockwise, with EXIF orientation 6 telling viewers to turn it back, as phones do."""
    upright = Image.fromarray(digit).resize((112, 112), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)


def test_image_kinds_people_send(exported_model, test_digits, tmp_path):
    pixels, labels = test_digits
    picked = confident_digits(exported_model, test_digits, 6)
    files, truth = [], []
    for i in picked:
        digit = pixels[i]
        big = Image.fromarray(digit).resize((84, 84), Image.BICUBIC)
        rgba = np.zeros((84, 84, 4), np.uint8)
        rgba[..., 3] = np.asarray(big)  # black ink whose opacity is the digit, on a transparent sheet
        kinds = {
            "rgba.png": Image.fromarray(rgba, "RGBA"),
            "palette.gif": big.convert("P"),
            "gray.bmp": big,
            # Dark ink on light paper in 16 bits: clipped to 8 bits instead of scaled, all of it would be white.
            "sixteen.png": Image.fromarray((60_000 - np.asarray(big).astype(np.uint16) * 196).astype(np.uint16)),
        }
        for name, img in kinds.items():
            files.append(tmp_path / f"{i}_{name}")
            img.save(files[-1])
            truth.append(int(labels[i]))
        files.append(tmp_path / f"{i}_rotated.jpg")
        exif_rotated_jpeg(digit, files[-1])
        truth.append(int(labels[i]))
    assert Image.open(tmp_path / f"{picked[0]}_sixteen.png").mode.startswith("I")  # really 16-bit on disk
    rows, summary = predict.predict(files, exported_model / "model.onnx", show_progress=False)
    assert summary["failed"] == 0
    wrong = [(r["input"], r["prediction"], t) for r, t in zip(rows, truth) if r["prediction"] != t]
    assert wrong == []
    # Without its orientation tag the stored, sideways JPEG reads as something else: the tag is what was applied.
    sideways = []
    for i in picked:
        Image.open(tmp_path / f"{i}_rotated.jpg").save(tmp_path / f"{i}_sideways.jpg", quality=95)
        sideways.append(tmp_path / f"{i}_sideways.jpg")
    rows, _ = predict.predict(sideways, exported_model / "model.onnx", show_progress=False)
    assert sum(r["prediction"] != labels[i] for r, i in zip(rows, picked)) >= len(picked) // 2


def test_invert_from_the_command_line_applies_to_arrays_too(exported_model, test_digits, tmp_path):
    pixels, labels = test_digits
    picked = confident_digits(exported_model, test_digits, 8)
    np.save(tmp_path / "digits.npy", pixels[picked])
    predicted = {}
    for invert in ("auto", "no", "yes"):
        out = tmp_path / f"{invert}.csv"
        run([*CLI, "predict", tmp_path / "digits.npy", "--model", exported_model / "model.onnx", "--out", out,
             "--invert", invert])
        predicted[invert] = [int(r["prediction"]) for r in csv.DictReader(out.open())]
    truth = [int(labels[i]) for i in picked]
    assert predicted["auto"] == predicted["no"] == truth  # MNIST rows are already white on black
    assert sum(p != t for p, t in zip(predicted["yes"], truth)) >= 6  # black on white is not what it learnt


def test_csv_streams_to_stdout_with_one_header_across_chunks(exported_model, test_digits, tmp_path):
    from click.testing import CliRunner

    from mnist_dist.cli import main

    pixels, labels = test_digits
    np.save(tmp_path / "digits.npy", pixels[:200])
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "digits.npy"), "--model",
                                       str(exported_model / "model.onnx"), "--chunk-size", "64"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # 200 rows in chunks of 64: four pieces written as they come
    assert lines[0] == "input,prediction,confidence,top3,error" and lines.count(lines[0]) == 1
    rows = list(csv.DictReader(lines))
    assert [r["input"].rsplit("#", 1)[1] for r in rows] == [str(i) for i in range(200)]
    assert np.mean([int(r["prediction"]) == label for r, label in zip(rows, labels)]) > 0.95


def test_every_output_format_holds_the_same_rows(exported_model, test_digits, tmp_path):
    import json

    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from mnist_dist.cli import main

    np.save(tmp_path / "digits.npy", test_digits[0][:150])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    inputs = [str(tmp_path / "digits.npy"), str(tmp_path / "broken.png")]
    for suffix in ("csv", "json", "jsonl", "parquet"):
        result = CliRunner().invoke(main, ["predict", *inputs, "--model", str(exported_model / "model.onnx"),
                                           "--chunk-size", "64", "--out", str(tmp_path / f"p.{suffix}")])
        assert result.exit_code == 0, result.output  # the broken file is a row
    as_json = json.loads((tmp_path / "p.json").read_text())
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == as_json
    table = pq.read_table(tmp_path / "p.parquet")
    assert pq.ParquetFile(tmp_path / "p.parquet").metadata.num_row_groups == 3  # 151 rows in chunks of 64
    assert table.to_pylist() == [{**row, "top3": [c for c, _ in row["top3"]]} for row in as_json]
    with open(tmp_path / "p.csv") as f:
        assert [(r["input"], r["prediction"]) for r in csv.DictReader(f)] == \
            [(row["input"], "" if row["prediction"] is None else str(row["prediction"])) for row in as_json]
    assert as_json[-1]["error"] and as_json[-1]["prediction"] is None and len(as_json) == 151
    assert "give a file ending in .csv, .json, .jsonl, .parquet" in command_error(
        [*inputs, "--model", exported_model / "model.onnx", "--out", tmp_path / "p.txt"])


def test_a_part_missing_at_the_merge_is_one_line_and_no_output(tmp_path):
    from mnist_dist.errors import UserError
    from mnist_dist.inference import storage
    from mnist_dist.inference.chunks import ChunkStore
    from mnist_dist.inference.outputs import Format

    out = storage.locate(tmp_path / "preds.csv")
    store = ChunkStore(out, {"inputs": "x"}, total=10, chunk=4)  # chunks 0..3, 4..7, 8..9
    store.start(resume=False)
    fmt = Format(out.name)
    row = {"input": "a", "prediction": 1, "confidence": 0.9, "top3": [[1, 0.9]], "error": ""}
    for k, start, stop in store.ranges():
        if k != 1:  # as if the process that had chunk 1 wrote it somewhere else, or not at all
            store.save(k, start, stop, [row] * (stop - start), fmt.body([row] * (stop - start)))
    with pytest.raises(UserError, match=r"the part for inputs 4\.\.7 .* is missing or incomplete"):
        store.merge(fmt)
    assert not (tmp_path / "preds.csv").exists() and not list(tmp_path.glob(".preds.csv.*.tmp"))
    store.save(1, 4, 8, [row] * 4, fmt.body([row] * 4))
    store.merge(fmt)
    assert (tmp_path / "preds.csv").read_text().count("\n") == 11 and not store.folder.fs.exists(store.folder.path)


def test_each_row_names_its_three_best_classes_best_first_and_a_tie_goes_to_the_lower_class():
    from mnist_dist.inference.inputs import Item
    from mnist_dist.inference.outputs import rows_for

    pixels = np.zeros((28, 28), np.float32)
    items = [Item(0, "a.png", pixels), Item(1, "b.png", error="not an image"), Item(2, "c.png", pixels)]
    probabilities = np.array([[0.02, 0.10, 0.30, 0.02, 0.30, 0.02, 0.02, 0.02, 0.10, 0.10],
                              [0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.91, 0.01, 0.01]], np.float32)
    rows = rows_for(items, [items[0], items[2]], probabilities, {"classes": [str(c) for c in range(10)]})
    assert [r["prediction"] for r in rows] == [2, None, 7] and rows[1]["error"] == "not an image"
    assert [c for c, _ in rows[0]["top3"]] == [2, 4, 1] and rows[0]["confidence"] == pytest.approx(0.30)
    assert rows[2]["top3"][0][0] == 7 and rows[1]["top3"] == []
