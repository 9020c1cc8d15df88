"""Training: config validation, exact resume, atomic checkpoints, and bad records skipped."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from crabplus import checkpoint
from crabplus.checkpoint import latest_checkpoint, load_tree, save_tree
from crabplus.config import (
    DataConfig,
    EvalConfig,
    RunConfig,
    TrainConfig,
    config_dict,
    load_config,
    resume_differences,
)
from crabplus.data.scene import SynthConfig
from crabplus.data.synth import generate
from crabplus.distributed import rank_batches
from crabplus.models import ModelConfig
from crabplus.train import train
from safetensors.torch import load_file

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "crabplus" / "configs"
SUBSETS = ["ks", "meld", "s4"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avuie")
    generate(root, train=4, test=2, seed=0, subsets=SUBSETS, config=SynthConfig(size=32))
    return root


def run_config(root: Path, out: Path, **train_kw) -> RunConfig:
    """A tiny I-LoRA run: dropout and an aux loss on, so RNG and aux handling matter for resume equality."""
    model = ModelConfig(r=4, lora_alpha=8, lora_dropout=0.1, num_experts=2, ilora_extra={"balance_loss_coef": 0.01})
    # One thread: runs compared for exact equality must not depend on the machine's load (default_threads).
    t = dict(out=str(out), max_steps=5, batch_size=2, grad_accum=2, lr=1e-2, device="cpu", warmup_ratio=0.2, threads=1)
    data = DataConfig(root=str(root), subsets=list(SUBSETS), frame_size=32)
    return RunConfig(data=data, model=model, train=TrainConfig(**{**t, **train_kw}), eval=EvalConfig(max_new_tokens=8))


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "adapter" / "adapter_model.safetensors"))


def test_resume_continues_exactly(tiny_data, tmp_path):
    # 12 records, micro-batches of 2, 2 per step: 3 steps per epoch, so 5 steps cross an epoch boundary.
    full = train(run_config(tiny_data, tmp_path / "full"), progress=False)
    first = train(run_config(tiny_data, tmp_path / "cut"), stop_after=2, progress=False)
    rest = train(run_config(tiny_data, tmp_path / "cut"), progress=False)
    assert full.steps == [1, 2, 3, 4, 5] and first.steps == [1, 2] and rest.steps == [3, 4, 5]
    assert first.losses + rest.losses == full.losses
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("ilora_B") or "ilora_B" in k for k in a)
    log = (tmp_path / "cut" / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,epoch,loss,aux_loss,lr,tokens_per_s" and len(log) == 6
    assert full.losses[-1] < full.losses[0] or all(math.isfinite(x) for x in full.losses)


def test_data_order_depends_on_seed_and_epoch_only():
    assert rank_batches(10, 3, 1, 0, 1) == rank_batches(10, 3, 1, 0, 1)
    assert rank_batches(10, 3, 1, 0, 1) != rank_batches(10, 3, 1, 0, 2)
    assert sorted(i for b in rank_batches(10, 3, 1, 5, 0) for i in b) == list(range(10))


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    cfg = run_config(tiny_data, tmp_path, max_steps=2, save_every=1)
    train(cfg, stop_after=1, progress=False)
    before = latest_checkpoint(tmp_path)
    weights = _adapter(tmp_path)

    def broken(stem, obj):
        stem.with_suffix(".json").write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_tree", broken)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False)
    assert latest_checkpoint(tmp_path) == before
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert all(torch.equal(weights[k], v) for k, v in _adapter(tmp_path).items())
    monkeypatch.undo()
    assert train(cfg, progress=False).steps == [2]  # resumes from the intact checkpoint


def test_state_round_trip_keeps_types(tmp_path):
    state = {"a": torch.arange(3), "b": {0: [1.5, None, "x"], 1: (2, 3)}, "c": torch.tensor(0.5)}
    save_tree(tmp_path / "s", state)
    back = load_tree(tmp_path / "s")
    assert torch.equal(back["a"], state["a"]) and back["b"] == {0: [1.5, None, "x"], 1: (2, 3)}
    assert back["c"].item() == 0.5


def test_corrupted_records_are_reported_and_training_continues(tiny_data, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    video = sorted((root / "ks" / "video").glob("ks_train_*"))[0]
    video.write_bytes(b"not a video")  # found only when read: check_media="exists"
    lines = (root / "meld" / "train.json").read_text().splitlines()
    lines[1] = lines[1][:20]  # a broken JSON record: reported at load
    (root / "meld" / "train.json").write_text("\n".join(lines))
    cfg = run_config(root, tmp_path / "run", max_steps=6, grad_accum=1, batch_size=2)
    cfg.data.check_media = "exists"
    result = train(cfg, progress=False)
    assert result.steps == [1, 2, 3, 4, 5, 6] and all(math.isfinite(x) for x in result.losses)
    assert result.skipped >= 1
    assert any("invalid JSON" in p.reason for p in result.report.problems)
    assert any(video.name in p.reason for p in result.report.read_problems)
    assert video.name in caplog.text


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_config(bad)
    bad.write_text("trainn: {}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"model\.adapter"):
        load_config(CONFIGS / "tiny.yaml", ["model.adapter=dora"])
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        train(run_config(tmp_path / "missing", tmp_path / "run"), progress=False)


def test_a_changed_config_does_not_resume_silently(tiny_data, tmp_path):
    train(run_config(tiny_data, tmp_path, max_steps=1), progress=False)
    with pytest.raises(ValueError, match=r"train\.lr"):
        train(run_config(tiny_data, tmp_path, max_steps=1, lr=0.5), progress=False)


@pytest.mark.parametrize("name", ["tiny.yaml", "crabplus_7b.yaml", "transfer_tiny.yaml"])
def test_configs_start_with_their_command_and_load(name):
    from crabplus.transfer import TransferRunConfig

    text = (CONFIGS / name).read_text()
    assert text.startswith("# Run: .venv/bin/crabplus ")
    cls = TransferRunConfig if name.startswith("transfer") else RunConfig
    load_config(CONFIGS / name, cls=cls)


def test_the_trainer_pieces_work_alone(tiny_data, tmp_path):
    from crabplus.train import Trainer

    trainer = Trainer(run_config(tiny_data, tmp_path, max_steps=3), progress=False).setup()
    assert (trainer.step, trainer.total, trainer.global_batch) == (0, 3, 4)
    assert (tmp_path / "config.yaml").is_file() and latest_checkpoint(tmp_path) is None
    group = [trainer.collate([trainer.dataset[i] for i in batch])[0] for batch in ([0, 1], [2, 3])]
    out = trainer.train_step(group)
    assert trainer.step == 1 and math.isfinite(out.loss) and out.aux_loss > 0
    assert out.lr == 0 < trainer.scheduler.get_last_lr()[0]  # warmup starts at 0, the scheduler stepped
    saved = trainer.save()
    assert saved.name == "step-000001" and latest_checkpoint(tmp_path) == saved
    resumed = Trainer(run_config(tiny_data, tmp_path, max_steps=3), progress=False).setup()
    assert resumed.step == 1 and resumed.checkpoint == saved


def test_a_damaged_checkpoint_is_named_with_the_one_to_fall_back_to(tiny_data, tmp_path):
    cfg = run_config(tiny_data, tmp_path, max_steps=3, save_every=1)
    train(cfg, stop_after=2, progress=False)
    newest = latest_checkpoint(tmp_path)
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert str(newest) in message and "step-000001" in message and "previous" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_missing_cuda_device_is_refused_before_the_run_folder_is_written(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"train\.device: 'cuda' .*no usable CUDA"):
        train(run_config(tiny_data, tmp_path / "run", device="cuda"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "blamed", "message"),
    [
        ("train:\n  lr: 1\n   epochs: 2\n", [], "cfg.yaml", "invalid YAML at line 3"),
        ("train: {lr: 1}\n", ["train.lr=["], "--set 'train.lr=['", "invalid YAML"),
        ("train: {lr: 1}\n", ["train.lrr=1"], "--set 'train.lrr=1'", "unknown key 'train.lrr'"),
        ("train: {lr: 1}\n", ["train.lr=fast"], "--set 'train.lr=fast'", "expected a number"),
        ("train: {lrr: 1}\n", ["train.lr=1"], "cfg.yaml", "unknown key"),
        ("model: {num_experts: 0}\n", [], "cfg.yaml", "model.num_experts: must be a positive integer"),
        ("train: {lr: 1}\n", ["model.num_experts=0"], "--set 'model.num_experts=0'", "model.num_experts"),
        ("model: {ilora_extra: {top_k: 9, routing: topk}}\n", [], "cfg.yaml", "model.ilora_extra.top_k"),
        ("train: {batch_size: 0}\n", [], "cfg.yaml", "train.batch_size: must be >= 1"),
    ],
)
def test_config_errors_name_the_file_or_the_set_and_the_key(tmp_path, yaml_text, overrides, blamed, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as err:
        load_config(path, overrides)
    text = str(err.value)
    assert text.startswith(str(path) if blamed == "cfg.yaml" else blamed) and message in text, text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("cores", "load", "processes", "want"),
    [(2, 0.1, 1, 2), (2, 3.5, 1, 1), (16, 4.0, 1, 12), (16, 0.0, 4, 4), (16, 14.0, 2, 2), (1, 0.0, 1, 1)],
)
def test_default_threads_never_oversubscribe(monkeypatch, cores, load, processes, want):
    import os

    from crabplus.train import default_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert default_threads(processes) == want


def test_default_threads_honour_omp_num_threads(monkeypatch):
    import os

    from crabplus.train import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(1) == 3


def test_resume_accepts_changes_that_cannot_change_the_weights(tiny_data, tmp_path, monkeypatch, caplog):
    full = train(run_config(tiny_data, tmp_path / "full"), progress=False)
    train(run_config(tiny_data, tmp_path / "cut"), stop_after=2, progress=False)
    monkeypatch.chdir(tmp_path)  # the same folder, named relatively; housekeeping and evaluation settings changed
    cfg = run_config(tiny_data, Path("cut"), save_every=1, keep_checkpoints=3)
    cfg.eval.max_new_tokens, cfg.eval.subsets, cfg.data.num_workers = 4, ["ks"], 0
    with caplog.at_level("INFO", logger="crabplus.train"):
        rest = train(cfg, progress=False)
    assert rest.steps == [3, 4, 5] and rest.losses == full.losses[2:]
    changed = [r.getMessage() for r in caplog.records if "do not change the trained weights" in r.getMessage()]
    assert len(changed) == 1 and "\n" not in changed[0], caplog.text
    for text in ("train.save_every 0 -> 1", "train.keep_checkpoints 2 -> 3", "eval.max_new_tokens 8 -> 4",
                 "eval.subsets null -> [ks]", "train.out"):  # fmt: skip
        assert text in changed[0], changed[0]


def test_a_refused_resume_names_each_key_with_both_values_and_the_ways_out(tiny_data, tmp_path):
    train(run_config(tiny_data, tmp_path, max_steps=1), progress=False)
    cfg = run_config(tiny_data, tmp_path, max_steps=1, lr=0.5, seed=3, save_every=1)
    cfg.model.num_experts = 3
    with pytest.raises(ValueError) as err:
        train(cfg, progress=False)
    text = str(err.value)
    for key in ("train.lr 0.01 -> 0.5", "train.seed 0 -> 3", "model.num_experts 2 -> 3"):
        assert key in text, text
    assert "save_every" not in text and "\n" not in text
    assert "--set train.lr=0.01" in text and "--out" in text and "delete" not in text


@pytest.mark.parametrize(
    ("section", "subsets", "message"),
    [
        ("data", {"ks": -1.0}, "data.subsets.ks: mixing ratio must be a finite number >= 0, got -1.0"),
        ("data", {"ks": float("nan")}, "data.subsets.ks: mixing ratio must be a finite number >= 0, got nan"),
        ("data", {"ks": float("inf")}, "data.subsets.ks: mixing ratio must be a finite number >= 0, got inf"),
        ("data", {"ks": 0.0, "meld": 0.0}, "data.subsets: every mixing ratio is 0"),
        ("data", [], "data.subsets: empty"),
        ("data", {}, "data.subsets: empty"),
        ("data", ["ks", "meld", "ks"], "data.subsets: ['ks'] named more than once"),
        ("eval", [], "eval.subsets: empty"),
        ("eval", ["ks", "ks"], "eval.subsets: ['ks'] named more than once"),
    ],
)
def test_subset_selections_are_refused_when_the_config_loads(tmp_path, section, subsets, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({section: {"subsets": subsets}, "train": {"out": str(tmp_path / "run")}}))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {message}"), err.value
    flow = yaml.safe_dump(subsets, default_flow_style=True).strip()
    with pytest.raises(ValueError) as err:
        load_config(CONFIGS / "tiny.yaml", [f"{section}.subsets={flow}"])
    assert str(err.value).startswith(f"--set '{section}.subsets=") and message in str(err.value), err.value


@pytest.mark.parametrize(
    ("change", "harmless", "blocking"),
    [
        ({"train": {"out": "/elsewhere/run"}, "data": {"root": "/elsewhere/run/data"}}, ["train.out"], []),
        ({"data": {"root": "/other/data"}}, [], ["data.root"]),
        ({"eval": {"max_samples": 3}, "train": {"save_every": 5, "threads": 2}},
         ["eval.max_samples", "train.save_every", "train.threads"], []),
        ({"model": {"ilora_extra": {"balance_loss_coef": 0.1}}, "train": {"max_steps": 9}},
         [], ["model.ilora_extra", "train.max_steps"]),
        ({"data": {"subsets": {"ks": 2.0}, "synth": {"seed": 1}}}, [], ["data.subsets", "data.synth.seed"]),
    ],
)  # fmt: skip
def test_resume_differences_sort_each_key(change, harmless, blocking):
    saved = config_dict(
        RunConfig(data=DataConfig(root="/runs/a/data", subsets=["ks"]), train=TrainConfig(out="/runs/a"))
    )
    now = {section: {**values} for section, values in saved.items()}
    for section, values in change.items():
        for key, value in values.items():
            now[section][key] = {**now[section][key], **value} if key == "synth" else value
    found = resume_differences(saved, now)
    assert (list(found[0]), list(found[1])) == (harmless, blocking)
    assert all(old != new for diff in found for old, new in diff.values())


def test_nothing_is_written_when_the_data_cannot_be_used(tiny_data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "ks").mkdir(parents=True)
    (empty / "ks" / "train.json").write_text("[]")
    cfg = run_config(empty, tmp_path / "run")
    cfg.data.subsets = ["ks"]
    with pytest.raises(ValueError, match="no usable training records"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
