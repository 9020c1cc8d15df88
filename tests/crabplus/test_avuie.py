"""The AV-UIE v2 loader on generated data, clean and corrupted: samples, mixing, and the load report."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch.utils.data
from crabplus import metrics
from crabplus.data.avuie import AVUIEDataset, collate_samples, read_records
from crabplus.data.media import read_audio
from crabplus.data.scene import SOURCES
from crabplus.data.synth import generate
from crabplus.data.windows import task_audio
from crabplus.interface import parse
from crabplus.tasks import TASKS

SUBSETS = ["ks", "a2v", "v2a", "meld", "ave", "ms3", "s4", "ref_avs", "arig", "avqa", "mer24", "avvp"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("avuie")
    generate(out, train=6, test=2, seed=2, subsets=SUBSETS)
    return out


def test_samples_follow_the_registry(root):
    ds = AVUIEDataset(root, SUBSETS, frame_size=32)
    assert len(ds) == 6 * len(SUBSETS) and ds.report.skipped == 0
    seen = set()
    for sample in ds:
        spec = TASKS[sample.subset]
        record = json.loads((root / sample.subset / "train.json").read_text())[sample.meta["index"]]
        assert sample.target == record[spec.target_field]
        assert sample.meta["reference"] == parse(sample.subset, sample.target)
        assert sample.audio.dtype == np.float32 and sample.frames.dtype == np.uint8
        videos = sum(m == "video" for m in spec.modalities)
        assert sample.frames.shape == (max(videos, 1) * spec.num_frames, 32, 32, 3)
        if sample.subset not in ("avqa", "ref_avs"):
            assert sample.instruction == spec.instruction
        seen.add(sample.subset)
    assert seen == set(SUBSETS)


def test_two_inputs_are_concatenated_and_avs_audio_is_cut(root):
    a2v = AVUIEDataset(root, ["a2v"], frame_size=32)[0]
    assert a2v.frames.shape[0] == 20
    v2a = AVUIEDataset(root, ["v2a"], frame_size=32)[0]
    assert len(v2a.audio) == 2 * 32000  # two 2-second clips
    ms3 = AVUIEDataset(root, ["ms3"], frame_size=32)
    for sample in ms3:
        assert len(sample.audio) == 32000 // 5 and sample.meta["frame_index"] is not None
        spectrum = np.abs(np.fft.rfft(sample.audio))
        peak = np.fft.rfftfreq(len(sample.audio), 1 / 16000)[spectrum.argmax()]
        heard = min(SOURCES, key=lambda s: abs(s.freq - peak))
        assert heard.name == sample.meta["reference"].label  # the loader cut the part of the labelled frame
        assert sample.meta["mask_path"].endswith(".png")
    ref = AVUIEDataset(root, ["ref_avs"], frame_size=32)[0]
    assert len(ref.audio) == 32000 // 10 and "<des>" in ref.instruction
    # Ref-AVS test records name their split (test_s / test_u / test_n): kept with the ids, into the predictions file
    assert {s.meta["ids"]["split"] for s in AVUIEDataset(root, ["ref_avs"], split="test", frame_size=32)} <= {
        "test_s",
        "test_u",
        "test_n",
    }


def test_mixing_ratios_are_deterministic(root):
    def keys(ds):
        return [(e.subset, e.index) for e in ds.entries]

    a = AVUIEDataset(root, {"ks": 0.5, "ave": 2.0}, seed=7, check_media="none")
    b = AVUIEDataset(root, {"ks": 0.5, "ave": 2.0}, seed=7, check_media="none")
    c = AVUIEDataset(root, {"ks": 0.5, "ave": 2.0}, seed=8, check_media="none")
    assert keys(a) == keys(b) and len(a) == 3 + 12
    assert [k for k in keys(a) if k[0] == "ave"] == [("ave", i) for i in range(6)] * 2
    assert len(c) == len(a)
    assert AVUIEDataset(root, {"ks": 0.0}, check_media="none").entries == []
    with pytest.raises(ValueError, match="mixing ratio of 'ks'"):
        AVUIEDataset(root, {"ks": -1.0})
    with pytest.raises(KeyError, match="unknown AV-UIE"):
        AVUIEDataset(root, ["nope"])
    with pytest.raises(ValueError, match="split"):
        AVUIEDataset(root, ["ks"], split="val")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AVUIEDataset(root / "missing")


def test_test_split_builds_references_from_fields(root):
    path = root / "ks" / "test.json"
    records = json.loads(path.read_text())
    backup = path.read_text()
    try:
        for rec in records:
            del rec["label"]  # the authors' test records carry the class, not the target text
        path.write_text(json.dumps(records))
        ds = AVUIEDataset(root, ["ks", "mer24"], split="test", check_media="none")
        assert len(ds) == 2 and ds.report.skipped == 0  # mer24 ships no test.json: nothing, and no problem
        for entry, rec in zip(ds.entries, records):
            assert entry.reference.label == rec["action"]
            assert parse("ks", entry.target).label == rec["action"]
    finally:
        path.write_text(backup)


@pytest.fixture
def corrupted(root, tmp_path):
    """ks with a missing field (0), a missing video (1), a garbage video (2) and a broken JSON line (3); 4, 5 good."""
    shutil.copytree(root / "ks", tmp_path / "ks")
    lines = (tmp_path / "ks" / "train.json").read_text().splitlines()
    records = [json.loads(line.rstrip(",")) for line in lines[1:-1]]
    del records[0]["audio_path"]
    (tmp_path / "ks" / "video" / records[1]["video_path"]).unlink()
    (tmp_path / "ks" / "video" / records[2]["video_path"]).write_bytes(b"\x00garbage" * 100)
    body = [json.dumps(r) for r in records]
    body[3] = body[3][: len(body[3]) // 2]
    (tmp_path / "ks" / "train.json").write_text("[\n" + ",\n".join(body) + "\n]\n")
    return tmp_path


def test_corrupted_records_are_reported_and_skipped(corrupted, caplog):
    with caplog.at_level(logging.WARNING):
        ds = AVUIEDataset(corrupted, ["ks"], frame_size=32)
    assert len(ds) == 2 and [e.index for e in ds.entries] == [4, 5]
    problems = {p.index: p for p in ds.report.problems}
    assert set(problems) == {0, 1, 2, 3}
    assert all(p.file.endswith("ks/train.json") for p in problems.values())
    assert "missing field(s) 'audio_path'" in problems[0].reason
    assert "missing video file" in problems[1].reason and "video_path" in problems[1].reason
    assert "unreadable video file" in problems[2].reason
    assert "invalid JSON" in problems[3].reason and problems[3].line == 5
    summary = ds.report.summary()
    assert "kept 2 records" in summary and "skipped 4" in summary and "[line 5]" in summary
    assert "skipped 4" in caplog.text
    assert len(list(ds)) == 2


def test_unreadable_media_at_read_time_is_skipped(corrupted, caplog):
    ds = AVUIEDataset(corrupted, ["ks"], frame_size=32, check_media="exists")
    assert [e.index for e in ds.entries] == [2, 4, 5]  # the garbage file exists, so it passes the index build
    with caplog.at_level(logging.WARNING):
        assert ds[0] is None
        assert [s.meta["index"] for s in ds] == [4, 5]
    assert len(ds.report.read_problems) == 2 and ds.report.read_problems[0].index == 2
    assert "unreadable media" in ds.report.read_problems[0].reason
    assert "skipped at read" in caplog.text
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)
    (batch,) = list(loader)
    assert [s.meta["index"] for s in batch] == [4, 5]


def test_whole_file_problems(tmp_path):
    (tmp_path / "ave").mkdir()
    (tmp_path / "ave" / "train.json").write_text('{"not": "a list"}')
    ds = AVUIEDataset(tmp_path, ["ave", "ks"])
    reasons = sorted(p.reason for p in ds.report.problems)
    assert len(ds) == 0 and reasons == ["no such file", "top level is dict, not a list of records"]
    assert all(p.index is None for p in ds.report.problems) and "[whole file]" in ds.report.summary()


def test_read_records_accepts_json_lines(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')
    records, problems = read_records(path)
    assert records == [(0, {"a": 1}), (2, {"a": 3})]
    assert [(p.index, p.line) for p in problems] == [(1, 2)]


def test_loader_applies_the_authors_windows_and_timing(root):
    # synth clips are 2 s: emotion audio is padded to the authors' 4 s; ks keeps 10 parts of int(32000 / 10) samples
    meld = AVUIEDataset(root, ["meld"], frame_size=32)[0]
    assert len(meld.audio) == 4 * 16000 and not meld.audio[2 * 16000 :].any()
    ks = AVUIEDataset(root, ["ks"], frame_size=32)[0]
    assert len(ks.audio) == 32000 and ks.meta["fps"] == 1.0
    avqa = AVUIEDataset(root, ["avqa"], frame_size=32)[0]
    assert len(avqa.audio) == 10 * 2 * int(32000 / 60)
    assert "fps" not in AVUIEDataset(root, ["ms3"], frame_size=32)[0].meta  # images carry no timing
    for split in ("train", "test"):  # s4 trains on the first fifth of the audio, and tests on the labelled frame's
        for sample in AVUIEDataset(root, ["s4"], split=split, frame_size=32):
            whole = read_audio(sample.meta["media"][1])
            part = sample.meta["frame_index"]
            assert split == "test" or part == 0
            np.testing.assert_array_equal(sample.audio, task_audio(whole, "s4", part))


def _llp_layout(tmp_path, root):
    """The AVVP test split as the authors ship it (filename, vid, event; no label_content) and LLP files whose rows
    (tab-separated filename, event_labels, onset, offset) hold each record's events."""
    out = tmp_path / "avuie"
    shutil.copytree(root / "avvp", out / "avvp")
    records = json.loads((out / "avvp" / "test.json").read_text())
    refs = {r["filename"]: parse("avvp", r.pop("label_content")) for r in records}
    (out / "avvp" / "test.json").write_text(json.dumps(records))
    rows = {"audio": [], "visual": []}
    for name, ref in refs.items():
        for modality, events in (("audio", ref.audio_events), ("visual", ref.visual_events)):
            rows[modality] += [f"{name}\t{label.replace(' ', '_')}\t{int(s)}\t{int(e)}" for label, s, e in events]
    labels = tmp_path / "llp"
    labels.mkdir()
    for modality, name in (("audio", "AVVP_eval_audio.csv"), ("visual", "AVVP_eval_visual.csv")):
        (labels / name).write_text("\n".join(["filename\tevent_labels\tonset\toffset", *rows[modality]]) + "\n")
    return out, labels, refs


def test_avvp_test_references_come_from_the_llp_files(tmp_path, root):
    out, labels, refs = _llp_layout(tmp_path, root)
    missing = AVUIEDataset(out, ["avvp"], split="test", frame_size=32)
    assert len(missing) == 0 and len(missing.report.problems) == len(refs)
    assert all("AVVP_eval_audio.csv" in p.reason and "--avvp-labels" in p.reason for p in missing.report.problems)
    given = AVUIEDataset(out, ["avvp"], split="test", frame_size=32, avvp_labels=labels)
    assert len(given) == len(refs) and given.report.skipped == 0
    for sample in given:
        want = refs[sample.meta["ids"]["filename"]]
        assert metrics.score("avvp", [want], [sample.meta["reference"]])["avvp_segment_type"] == 1.0
    for name in ("AVVP_eval_audio.csv", "AVVP_eval_visual.csv"):  # the documented layout: beside test.json
        shutil.copy(labels / name, out / "avvp" / name)
    assert len(AVUIEDataset(out, ["avvp"], split="test", frame_size=32)) == len(refs)
    first = next(iter(refs))
    (out / "avvp" / "AVVP_eval_audio.csv").write_text("filename\tevent_labels\tonset\toffset\n")
    (out / "avvp" / "AVVP_eval_visual.csv").write_text(f"{first}\tDog\t0\t4\n")  # no header
    with pytest.raises(ValueError, match="header"):
        AVUIEDataset(out, ["avvp"], split="test", frame_size=32)


@pytest.mark.parametrize(
    ("subset", "split", "field"),
    [("ms3", "train", "frame_idx"), ("ms3", "test", "frame_idx"), ("s4", "test", "frame_idx"),
     ("ref_avs", "train", "idx"), ("ref_avs", "test", "idx")],
)  # fmt: skip
def test_a_missing_frame_index_is_a_bad_record_never_part_0(tmp_path, root, subset, split, field):
    # The authors' loader reads sample['frame_idx'] (ms3; s4 and ref_avs test) and sample['idx'] (ref_avs train):
    # a record without it raises KeyError there. Only s4 training ignores it (always part 0), checked below.
    out = tmp_path / "avuie"
    shutil.copytree(root / subset, out / subset)
    path = out / subset / f"{split}.json"
    records = json.loads(path.read_text())
    for key in ("frame_idx", "idx"):
        records[0].pop(key, None)
    records[1][next(k for k in ("frame_idx", "idx") if k in records[1])] = 99  # past the last audio part
    path.write_text(json.dumps(records))
    ds = AVUIEDataset(out, [subset], split=split, frame_size=32, check_media="exists")
    assert len(ds) == len(records) - 2 and [p.index for p in ds.report.problems] == [0, 1]
    assert f"'{field}'" in ds.report.problems[0].reason and "99" in ds.report.problems[1].reason


def test_s4_training_needs_no_frame_index(tmp_path, root):
    out = tmp_path / "avuie"
    shutil.copytree(root / "s4", out / "s4")
    records = json.loads((out / "s4" / "train.json").read_text())
    for record in records:
        record.pop("frame_idx")
    (out / "s4" / "train.json").write_text(json.dumps(records))
    ds = AVUIEDataset(out, ["s4"], frame_size=32, check_media="exists")
    assert len(ds) == len(records) and ds.report.skipped == 0
    assert all(sample.meta["frame_index"] == 0 for sample in ds)
