"""End to end: the CLI trains real packs on generated demo data; the feature cache means the
image tower runs once per image, not once per epoch or per run."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import mlilt
from mlilt.cli import app
from mlilt.demo.data import generate_demo
from mlilt.data.pairs import read_pairs
from mlilt.evaluation.pairs_eval import evaluate_pairs
from mlilt.towers.registry import register_tower
from mlilt.cli.train import NEGATED, config_from_options
from mlilt.training import Callback, TrainConfig, train
from mlilt.training.config import check_settings
from mlilt.training.optim import build_schedule
from tiny_towers import ForwardCalls, tiny_text_tower, tiny_timm_cnn

runner = CliRunner()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    generate_demo(out, ["en", "sw"], n=300, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-demo") / "data"
    generate_demo(out, ["en", "sw"], n=80, seed=0, image_size=32)
    return out


@pytest.mark.slow
def test_cli_train_on_offline_towers_learns_swahili(demo_data, tmp_path):
    """Held-out recall@1 after training is at least 5x chance (real towers, real files)."""
    out = tmp_path / "langpacks" / "sw"
    # The text side trains (ln + adapters); the image tower stays frozen so its features are
    # cached and this test stays within CI time. The default method is exercised by `mlilt demo`.
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(demo_data / "sw" / "train.jsonl"),
                                 "--out", str(out), "--method", "ln@text+adapter", "--epochs", "3",
                                 "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    assert (out / "langpack.json").is_file() and (out / "langpack.safetensors").is_file()
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]

    model = mlilt.load(out)
    assert model.encode_text(["mbwa anakimbia"], lang="sw").shape == (1, 256)
    test = read_pairs(demo_data / "sw" / "test.jsonl", lang="sw")
    metrics = evaluate_pairs(model.texts["sw"], model.image, test)
    chance = 100.0 / len({p.image for p in test})
    assert metrics["image_retrieval_recall@1"] >= 5 * chance, metrics
    assert metrics["text_retrieval_recall@1"] >= 5 * chance, metrics


def _tiny_config(data, out, **overrides) -> TrainConfig:
    settings = dict(lang="sw", data=str(data / "sw" / "train.jsonl"), out=str(out), text_tower="tiny-bert-0",
                    image_tower="tiny-timm-cnn", epochs=3, batch_size=8)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def tiny_towers():
    text, image = tiny_text_tower(), tiny_timm_cnn()
    register_tower(text)
    register_tower(image)
    return text, image


def test_feature_cache_hit_on_later_epochs_and_runs(tiny_demo_data, tmp_path, tiny_towers):
    calls = ForwardCalls(tiny_towers[1])
    first = train(_tiny_config(tiny_demo_data, tmp_path / "a", method="ln@text"))
    calls_after_first = calls.count
    assert first.pack.is_dir()
    images = {p.image for p in read_pairs(tiny_demo_data / "sw" / "train.jsonl")}
    batches_needed = -(-len(images) // 32) + 1  # the train and val feature passes
    assert 0 < calls_after_first <= batches_needed  # one pass over the images, not one per epoch

    train(_tiny_config(tiny_demo_data, tmp_path / "b", method="lora", seed=1))
    assert calls.count == calls_after_first  # second run: every feature from disk


class Recorder(Callback):
    """Every hook call, by name, with what a measuring script would read from it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def on_model_built(self, model, report):
        self.calls.append(("on_model_built", report.method, next(model.parameters()).device.type))

    def on_image_features(self, images, seconds):
        self.calls.append(("on_image_features", images.cached, seconds >= 0))

    def on_fit_start(self, state):
        self.calls.append(("on_fit_start", state.step, [row["epoch"] for row in state.history]))

    def on_step_start(self, info):
        self.calls.append(("on_step_start", info.epoch, info.step, len(info.batch), info.local == info.batch))

    def on_step_phase(self, info, phase):
        self.calls.append(("on_step_phase", phase))

    def on_step_end(self, info):
        self.calls.append(("on_step_end", info.seconds > 0, info.started > 0, info.loss is not None, info.fault))

    def on_epoch_end(self, row):
        self.calls.append(("on_epoch_end", row["epoch"]))

    def on_checkpoint(self, state):
        self.calls.append(("on_checkpoint", state.step))


def test_callbacks_hear_the_run_in_order(tiny_demo_data, tmp_path, tiny_towers):
    first, second = Recorder(), Recorder()
    result = train(_tiny_config(tiny_demo_data, tmp_path / "a", method="ln@text", epochs=2, checkpoint_every=2),
                   callbacks=[first, second])
    assert first.calls == second.calls
    calls = first.calls
    steps = sum(1 for call in calls if call[0] == "on_step_end")
    per_epoch = steps // 2
    assert steps == 2 * per_epoch and per_epoch >= 2
    expected = [("on_model_built", "ln@text", "cpu"), ("on_image_features", True, True), ("on_checkpoint", 0),
                ("on_fit_start", 0, [0])]
    for step in range(steps):
        epoch = step // per_epoch + 1
        expected += [("on_step_start", epoch, step, 8, True)]
        expected += [("on_step_phase", phase) for phase in ("text", "image", "loss", "backward", "update")]
        expected += [("on_step_end", True, True, True, None)]
        if (step + 1) % per_epoch and (step + 1) % 2 == 0:
            expected += [("on_checkpoint", step + 1)]  # within the epoch; its end has its own
        if (step + 1) % per_epoch == 0:
            expected += [("on_checkpoint", step + 1), ("on_epoch_end", epoch)]
    assert calls == expected
    assert [row["epoch"] for row in result.history] == [0, 1, 2]


def test_training_the_image_side_runs_the_tower_every_epoch(tiny_demo_data, tmp_path, tiny_towers):
    calls = ForwardCalls(tiny_towers[1])
    train(_tiny_config(tiny_demo_data, tmp_path / "a", method="ln", epochs=1))
    one_epoch = calls.count
    train(_tiny_config(tiny_demo_data, tmp_path / "b", method="ln", epochs=2))
    assert calls.count - one_epoch > one_epoch  # no cache when the tower trains


def test_cli_refuses_to_overwrite_a_finished_pack(tiny_demo_data, tmp_path, tiny_towers):
    out = tmp_path / "sw"
    train(_tiny_config(tiny_demo_data, out, epochs=1))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(out), "--text-tower", "tiny-bert-0", "--image-tower",
                                 "tiny-timm-cnn", "--epochs", "1"])
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_cli_bad_data_exits_with_a_message_and_writes_nothing(tmp_path, tiny_towers):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "mraba"}\n')
    out = tmp_path / "pack"
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(bad), "--out", str(out),
                                 "--text-tower", "tiny-bert-0", "--image-tower", "tiny-timm-cnn"])
    assert result.exit_code == 3, result.output
    assert "pairs.jsonl:1" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_lang_without_rows_names_the_languages_present(tiny_demo_data, tmp_path, tiny_towers):
    result = runner.invoke(app, ["train", "--lang", "bn", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(tmp_path / "p"), "--text-tower", "tiny-bert-0",
                                 "--image-tower", "tiny-timm-cnn"])
    assert result.exit_code == 3
    assert "bn" in result.output and "sw" in result.output


def test_cli_unknown_method_is_a_usage_error(tiny_demo_data, tmp_path):
    result = runner.invoke(app, ["train", "--lang", "sw", "--data", str(tiny_demo_data / "sw" / "train.jsonl"),
                                 "--out", str(tmp_path / "p"), "--method", "ln+prompt"])
    assert result.exit_code == 2
    assert "prompt" in result.output and "known" in result.output


def test_train_help_says_which_sides_each_method_touches():
    result = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for line in ("ln (text+image)", "full-text (text)", "head (projections only)"):
        assert line in result.output


def _old_factor(step: int, total: int, warmup: int, min_lr_ratio: float) -> float:
    """The warmup + cosine factor as written out by hand: (step+1)/warmup, then a half cosine
    from 1 at step ``warmup`` to ``min_lr_ratio`` at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("total, warmup_steps, min_lr_ratio", [(40, None, 0.1), (7, None, 0.1), (100, 10, 0.0),
                                                               (30, 0, 0.25)])
def test_schedule_is_the_warmup_and_cosine_formula(total, warmup_steps, min_lr_ratio):
    """The same warmup, the same cosine from the peak to lr * min_lr_ratio; transformers' cosine
    runs one step ahead of the hand-written one, so the last step trains at the floor itself."""
    config = TrainConfig(lang="sw", data="-", out="-", lr=1e-3, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    warmup = warmup_steps if warmup_steps is not None else max(1, total // 20)
    optimizer = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]},
                                   {"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}], lr=config.lr)
    schedule = build_schedule(optimizer, total, config)
    rates = []
    for _ in range(total):
        rates.append(schedule.get_last_lr())
        optimizer.step()
        schedule.step()
    for step, (first, second) in enumerate(rates):
        assert first == second  # one rate for both parameter groups
        wanted = _old_factor(step if step < warmup else step + 1, total, warmup, min_lr_ratio)
        assert first == pytest.approx(config.lr * wanted, rel=1e-12, abs=1e-18), step
    assert rates[-1][0] == pytest.approx(config.lr * min_lr_ratio)  # the last step: the floor
    if warmup:
        assert max(rate for rate, _ in rates) == pytest.approx(config.lr)  # the warmup's last step: the peak


def test_cli_options_are_the_train_config_fields_with_its_defaults():
    """``mlilt train`` has one option per TrainConfig field, named after it, defaulting to its default."""
    from mlilt.cli.train import train_command

    options = inspect.signature(train_command.__wrapped__ if hasattr(train_command, "__wrapped__")
                                else train_command).parameters
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert {NEGATED.get(name, name) for name in options} == set(fields)
    for name, option in options.items():
        field = fields[NEGATED.get(name, name)]
        if name in ("data", "parallel"):  # either source may be left out on the command line
            assert option.default is None, name
        elif field.default is dataclasses.MISSING:
            assert option.default is inspect.Parameter.empty, name
        else:
            assert option.default == (not field.default if name in NEGATED else field.default), name
    built = config_from_options({name: option.default for name, option in options.items()
                                 if option.default is not inspect.Parameter.empty} | {"lang": "sw", "data": "d",
                                                                                         "out": "o"})
    assert built == TrainConfig(lang="sw", data="d", out="o")


@pytest.mark.parametrize("settings, message", [({"epochs": "3"}, "epochs must be int"),
                                               ({"lr": "1e-4"}, "lr must be float"),
                                               ({"bf16": 1}, "bf16 must be bool"),
                                               ({"epochs": 0}, "--epochs must be at least 1"),
                                               ({"optimiser": "sgd"}, "unknown setting optimiser")])
def test_settings_are_checked_against_train_config(settings, message):
    with pytest.raises(mlilt.errors.UsageError, match=message):
        check_settings(settings, "study.yaml: train")
    check_settings({"epochs": 3, "lr": 1, "warmup_steps": None, "pooling": "mean"})
