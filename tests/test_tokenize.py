"""bavq-tokenize: 2 ranks write every sample exactly once with Tokenizer.encode's indices, a rerun after
an interruption rewrites only unfinished shards, a map-style split works, bad inputs exit 2 in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ROOT

from bavq.data.shards import sample_image_bytes
from bavq.data.sources import decode_image, load_map_splits
from bavq.data.transforms import eval_transform
from bavq.prep import main as prep_main
from bavq.tokenize import STATE_DIR, main
from bavq.tokenizer import Tokenizer


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of a tar, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def tokenize(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, "-m", "bavq.tokenize", *args, "--workers=0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image_shards(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "images"
    assert prep_main(["--source", "image_folder", "--input", str(tiny_run.parents[1] / "images"), "--output",
                      str(out), "--samples_per_shard", "5", "--workers", "0", "--val_fraction", "0.2",
                      "--no-progress"]) == 0
    return out


def expected_tokens(tokenizer: Tokenizer, shards: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    """{key: (cls, indices)} computed directly: decode, evaluation transform, Tokenizer.encode."""
    transform = eval_transform(tokenizer.config.data)
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for key, sample in read_tar(tar).items():
            image = transform(decode_image(sample_image_bytes(sample)))
            out[key] = (sample["cls"], tokenizer.encode(image[None])[0].numpy())
    return out


def written_tokens(out: Path) -> dict[str, tuple[bytes, np.ndarray]]:
    found: dict[str, tuple[bytes, np.ndarray]] = {}
    for tar in sorted(out.glob("*.tar")):
        for key, sample in read_tar(tar).items():
            assert key not in found, f"{key} written twice"
            found[key] = (sample["cls"], np.load(io.BytesIO(sample["npy"])))
    return found


@pytest.mark.slow
def test_two_ranks_write_every_sample_once_and_a_rerun_resumes(tiny_run, image_shards, tmp_path):
    out = tmp_path / "tokens"
    proc = tokenize([str(tiny_run), "--shards", str(image_shards), "--out", str(out), "--batch_size=3"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in 3 shards (0 kept" in proc.stderr  # rank 0 took units 0, 2, 4 of 5; rank 1 the others
    tokenizer = Tokenizer.from_pretrained(tiny_run)
    expected, found = expected_tokens(tokenizer, image_shards), written_tokens(out)
    assert sorted(found) == sorted(expected) and len(found) == 24  # every sample exactly once
    for key, (cls, grid) in expected.items():
        assert found[key][0] == cls
        assert found[key][1].dtype == np.int16 and found[key][1].shape == (4, 4)
        np.testing.assert_array_equal(found[key][1], grid)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {tar.name: len(read_tar(tar)) for tar in sorted(out.glob("*.tar"))}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 24 and manifest["num_codes"] == 32 and manifest["grid_shape"] == [4, 4]
    assert manifest["tokenizer"] == str(tiny_run.resolve()) and manifest["dtype"] == "int16"

    # what a kill leaves behind: a unit cut short (temporary tar), and a unit renamed but not yet recorded
    names = sorted(sizes)
    (out / names[0]).rename(out / f".{names[0]}.tmp")
    (out / STATE_DIR / f"{names[0]}.json").unlink()
    (out / STATE_DIR / f"{names[1]}.json").unlink()
    (out / "manifest.json").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in names[2:]}
    proc = tokenize([str(tiny_run), "--shards", str(image_shards), "--out", str(out)])  # 1 rank this time
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 shards (3 kept from earlier runs)" in proc.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in names[2:]} == kept  # finished units untouched
    again = written_tokens(out)
    assert sorted(again) == sorted(expected)
    for key, (_, grid) in expected.items():
        np.testing.assert_array_equal(again[key][1], grid)
    assert not list(out.glob(".*.tmp")) and json.loads((out / "manifest.json").read_text())["count"] == 24


@pytest.mark.slow
def test_a_map_style_split_of_the_config(tiny_run, tmp_path):
    out = tmp_path / "tokens"
    proc = tokenize([str(tiny_run), "--split", "val", "--out", str(out), "--samples_per_shard=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = Tokenizer.from_pretrained(tiny_run)
    _, val = load_map_splits(tokenizer.config.data)
    transform = eval_transform(tokenizer.config.data)
    found = {}
    for tar in sorted(out.glob("val-*.tar")):
        for key, sample in read_tar(tar).items():
            assert "cls" not in sample  # map-style sources carry no class into the tokens
            found[key] = np.load(io.BytesIO(sample["npy"]))
    assert len(found) == len(val) and len(list(out.glob("val-*.tar"))) == -(-len(val) // 3)
    images = torch.stack([transform(val.load(i)) for i in range(len(val))])
    expected = tokenizer.encode(images).numpy()
    for i in range(len(val)):  # keys are positions in the source
        np.testing.assert_array_equal(found[f"{val.indices[i]:09d}"], expected[i])


@pytest.mark.parametrize("make_args, needle", [
    (lambda run, shards, tmp: [str(tmp / "missing"), "--shards", str(shards)], "neither a run folder"),
    (lambda run, shards, tmp: [str(run), "--shards", str(tmp / "none-{000..002}.tar")], "3 of 3 shards"),
    (lambda run, shards, tmp: [str(run), "--shards", str(shards), "--batch_size=0"], "--batch_size"),
    (lambda run, shards, tmp: [str(run), "--split", "test"], "--split"),
    (lambda run, shards, tmp: [str(run), "--shards", str(shards), "--split", "val"], "not allowed"),
    (lambda run, shards, tmp: [str(run), "--shards", str(shards), "data.no_such_key=1"], "data.no_such_key"),
])
def test_bad_inputs_exit_2_with_one_line(tiny_run, image_shards, tmp_path, capsys, make_args, needle):
    assert main(make_args(tiny_run, image_shards, tmp_path) + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_an_output_folder_of_other_tokens_is_refused(tiny_run, image_shards, tmp_path, capsys):
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / "plan.json").write_text(json.dumps({"tokenizer": "/elsewhere"}))
    assert main([str(tiny_run), "--shards", str(image_shards), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds tokens written with other settings" in err, err
