"""`tarflow data write` interrupted and resumed, and split into parts that a final step puts together: finished
shards are never rewritten, a shard is finished only once complete, and the result is the dataset of one write."""

import io
import json
import tarfile
from pathlib import Path

import pytest

from data_pipeline import DataConfig, build_loader
from data_pipeline.sources import open_source
from data_pipeline.split_output import SplitOutput
from data_pipeline.write_progress import WriteProgress
from data_pipeline.write_record import WritePart
from data_pipeline.writer import finalize_parts, write_dataset, write_part
from tarflow.main import main

SHARD_SIZE = 20_000  # about 9 digits a webdataset shard, 30 an MDS shard


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way out may handle it."""


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _identity(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, path.read_bytes()


def _die_at_shard(monkeypatch, number):
    """From now on, the ``number``-th train shard's publication dies halfway, as a kill would leave it: a partial
    temporary file beside the finished shards."""
    real_put = SplitOutput.put
    seen = []

    def put(self, name, data):
        if name.startswith(("shard", "part-")) and self.uri.endswith("train"):
            seen.append(name)
            if len(seen) == number:
                Path(self.uri, f"{name}.tmp-4242").write_bytes(data[:len(data) // 2])
                raise Killed
        real_put(self, name, data)

    monkeypatch.setattr(SplitOutput, "put", put)


@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_an_interrupted_write_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch, fmt):
    source = open_source("digits")
    reference = _files(write_dataset(source, str(tmp_path / "ref"), fmt, shard_size=SHARD_SIZE) and tmp_path / "ref")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _die_at_shard(patch, 6)
        with pytest.raises(Killed):
            write_dataset(source, str(out), fmt, shard_size=SHARD_SIZE, workers=2)
    train = out / "train"
    record = json.loads((train / "write-progress.json").read_text())
    finished = [s["name"] for s in record["shards"]]
    assert len(finished) == 5 and not record["complete"] and not (train / "manifest.json").exists()
    assert any(".tmp-" in p.name for p in train.iterdir())
    # killed between a rename and the record: a file under a final name that the record does not list
    unlisted = train / ("shard-000005.tar" if fmt == "webdataset" else "shard.00005.mds")
    unlisted.write_bytes(b"whatever was there")
    before = {name: _identity(train / name) for name in finished}

    write_dataset(source, str(out), fmt, shard_size=SHARD_SIZE, workers=2)
    assert {name: _identity(train / name) for name in finished} == before
    assert _files(out) == reference
    assert not any(".tmp-" in p.name for p in train.iterdir())


def test_a_listed_shard_that_is_short_or_missing_is_rewritten_with_every_shard_after_it(tmp_path):
    source = open_source("digits")
    manifests = write_dataset(source, str(tmp_path), "webdataset", shard_size=SHARD_SIZE)
    reference = _files(tmp_path)
    train = tmp_path / "train"
    names = [s.name for s in manifests["train"].shards]
    kept = {name: _identity(train / name) for name in names[:3]}
    later = {name: _identity(train / name) for name in names[4:]}
    (train / names[3]).write_bytes((train / names[3]).read_bytes()[:-512])  # truncated
    heldout = {name: _identity(tmp_path / "heldout" / name) for name in _files(tmp_path / "heldout")}

    write_dataset(source, str(tmp_path), "webdataset", shard_size=SHARD_SIZE)
    assert _files(tmp_path) == reference
    assert {name: _identity(train / name) for name in names[:3]} == kept
    assert all(_identity(train / name)[0] != later[name][0] for name in names[4:])  # new files
    # the held-out split was complete: only its manifest is written again
    assert {name: _identity(tmp_path / "heldout" / name) for name in heldout if "manifest" not in name} == \
        {name: v for name, v in heldout.items() if "manifest" not in name}


def test_a_write_with_other_settings_does_not_continue_or_touch_a_recorded_one(tmp_path, capsys):
    args = ["data", "write", "--source", "digits", "--format", "webdataset", "--out", str(tmp_path), "--workers",
            "1", "--shard-size", str(SHARD_SIZE)]
    assert main(args) == 0
    before = _files(tmp_path)
    capsys.readouterr()
    assert main(args[:-1] + ["30000"]) == 2
    err = capsys.readouterr().err
    assert "records a write with other settings (settings.shard_size: 20000 -> 30000)" in err
    assert f"delete {tmp_path / 'heldout'} to start over" in err or f"delete {tmp_path / 'train'}" in err
    assert _files(tmp_path) == before


def _stored_samples(root, split, fmt):
    """(key, image bytes, label) of a split in its manifest's order, read with tarfile / streaming's reader."""
    manifest = json.loads((Path(root) / split / "manifest.json").read_text())
    out = []
    if fmt == "webdataset":
        for shard in manifest["shards"]:
            with tarfile.open(Path(root) / split / shard["name"]) as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
            out += [(a[0].split(".")[0], a[1], int(b[1])) for a, b in zip(members[::2], members[1::2])]
        return out
    from streaming.base.format import reader_from_json

    index = json.loads((Path(root) / split / "index.json").read_text())
    for entry in index["shards"]:
        shard = reader_from_json(str(Path(root) / split), None, entry)
        out += [(s["key"], s["image"], s["label"]) for s in (shard.get_item(i) for i in range(shard.samples))]
    return out


def _heldout_batches(uri, fmt):
    loader = build_loader(DataConfig(format=fmt, uri=uri), "heldout", 32, seed=0)
    return [(b.images, b.labels, b.indices) for b in loader]


@pytest.mark.streaming  # builds an MDS loader: see tests/conftest.py
@pytest.mark.parametrize("fmt", ["webdataset", "mds"])
def test_parts_written_apart_and_finalized_hold_the_dataset_of_one_write(tmp_path, fmt):
    source = open_source("digits")
    whole = write_dataset(source, str(tmp_path / "whole"), fmt, shard_size=SHARD_SIZE)
    out = tmp_path / "parts"
    for index in (2, 0, 1):  # in any order, as array tasks finish
        write_part(source, str(out), fmt, WritePart(index, 3), shard_size=SHARD_SIZE, workers=2)
    assert not (out / "train" / "manifest.json").exists()
    manifests = finalize_parts(str(out), fmt)
    for split in ("train", "heldout"):
        assert _stored_samples(out, split, fmt) == _stored_samples(tmp_path / "whole", split, fmt)
        names = [s.name for s in manifests[split].shards]
        assert len(set(names)) == len(names) and all(n.startswith("part-0000") for n in names)
        assert [n[:19] for n in names] == sorted(n[:19] for n in names)  # part order
        assert manifests[split].num_samples == whole[split].num_samples
    for a, b in zip(_heldout_batches(str(out), fmt), _heldout_batches(str(tmp_path / "whole"), fmt), strict=True):
        assert all((x == y).all() for x, y in zip(a, b))


def test_parts_on_s3_finalize_into_the_manifests_of_local_parts(tmp_path, s3_bucket):
    from data_pipeline.storage import read_text

    source = open_source("digits")
    for index in range(2):
        write_part(source, str(tmp_path), "mds", WritePart(index, 2), shard_size=SHARD_SIZE)
        write_part(source, f"s3://{s3_bucket}/d", "mds", WritePart(index, 2), shard_size=SHARD_SIZE, workers=2)
    assert finalize_parts(str(tmp_path), "mds") == finalize_parts(f"s3://{s3_bucket}/d", "mds")
    assert read_text(f"s3://{s3_bucket}/d/train/index.json") == (tmp_path / "train" / "index.json").read_text()


def test_finalize_refuses_missing_unfinished_or_mismatched_parts(tmp_path, monkeypatch, capsys):
    source = open_source("digits")
    base = ["data", "write", "--format", "webdataset", "--out", str(tmp_path)]
    write_part(source, str(tmp_path), "webdataset", WritePart(0, 3), shard_size=SHARD_SIZE)
    with monkeypatch.context() as patch:
        _die_at_shard(patch, 2)
        with pytest.raises(Killed):
            write_part(source, str(tmp_path), "webdataset", WritePart(1, 3), shard_size=SHARD_SIZE)
    assert main(base + ["--finalize"]) == 2
    assert f"{tmp_path / 'train'}: part(s) 2 of 3 have not been written; run them with --part I/3" in \
        capsys.readouterr().err
    write_part(source, str(tmp_path), "webdataset", WritePart(2, 3), shard_size=SHARD_SIZE)
    assert main(base + ["--finalize"]) == 2
    assert "part 1/3 of" in (err := capsys.readouterr().err) and "is not finished (9 of 539 samples)" in err
    assert "rerun it with --part 1/3 (it resumes)" in err
    # a write in one go, or in another number of parts, into the same place
    assert main(base + ["--source", "digits"]) == 2
    assert "holds parts of a write in 3 parts; finish them (--part I/3) and run with --finalize" in \
        capsys.readouterr().err
    assert main(base + ["--source", "digits", "--part", "0/2"]) == 2
    assert "holds parts of a write in 3 parts, not 2" in capsys.readouterr().err
    write_part(source, str(tmp_path), "webdataset", WritePart(1, 3), shard_size=SHARD_SIZE)
    # the write's own command line with --finalize checks its settings against the parts'
    assert main(base + ["--source", "digits", "--finalize"]) == 2
    assert "written with other settings than this command's (shard_size: 20000 -> 67108864: parts -> command)" \
        in capsys.readouterr().err
    assert not (tmp_path / "train" / "manifest.json").exists()
    assert main(base + ["--source", "digits", "--shard-size", str(SHARD_SIZE), "--finalize"]) == 0
    assert "1617 samples in" in capsys.readouterr().out


def test_a_part_refuses_a_place_written_in_one_go(tmp_path, capsys):
    write_dataset(open_source("digits"), str(tmp_path), "webdataset", shard_size=SHARD_SIZE)
    assert main(["data", "write", "--source", "digits", "--format", "webdataset", "--out", str(tmp_path),
                 "--part", "0/2"]) == 2
    assert "holds a write in one go (write-progress.json); rerun it without --part" in capsys.readouterr().err


def test_the_part_command_says_what_it_wrote_and_what_comes_next(tmp_path, capsys):
    args = ["data", "write", "--source", "digits", "--format", "mds", "--out", str(tmp_path), "--workers", "2"]
    assert main(args + ["--part", "1/2"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/train: part 1/2 has samples 808:1617 of 1617 in 1 mds shards" in out
    assert "the same command with --finalize instead of --part" in out


@pytest.mark.parametrize("args, message", [
    (["--part", "3/2"], "--part '3/2': expected I/N with 0 <= I < N"),
    (["--part", "one/2"], "--part 'one/2': expected I/N"),
    (["--workers", "0"], "--workers must be at least 1 (processes preparing images), got 0"),
    (["--part", "0/2", "--finalize"], "--finalize puts the parts together: give it without --part"),
])
def test_bad_options_are_one_line_and_write_nothing(tmp_path, capsys, args, message):
    assert main(["data", "write", "--source", "digits", "--format", "webdataset", "--out", str(tmp_path / "x"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    terminal = _Terminal()
    bar = WriteProgress(100, 20, stream=terminal)
    bar.describe("train")
    bar.update(30)
    bar.close()
    assert "train:" in terminal.getvalue() and "50/100" in terminal.getvalue() and "img/s" in terminal.getvalue()

    log = io.StringIO()
    lines = WriteProgress(100, 20, stream=log, every=0.0)
    lines.describe("heldout")
    lines.update(30)
    text = log.getvalue()
    assert text.startswith("heldout: 50/100 images (50.0%), ") and " img/s, eta " in text and "\r" not in text
    quiet = io.StringIO()
    WriteProgress(100, stream=quiet, enabled=False).update(100)
    silent_log = io.StringIO()
    WriteProgress(100, stream=silent_log).update(100)  # under a minute: no line yet
    assert quiet.getvalue() == silent_log.getvalue() == ""
