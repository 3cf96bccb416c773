"""Fast checks of the pipeline pieces: CLI and config, augmentation, schedule, EMA, samplers, checkpoints."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mpvg_kernels import cli
from mpvg_kernels.data import EvalTransform
from mpvg_kernels.errors import UserError
from mpvg_kernels.train import checkpoint as C
from mpvg_kernels.train.augment import MixupCutmix, TrainTransform, classification_loss, smooth_one_hot
from mpvg_kernels.train.config import FIELDS, TrainConfig, build_config, list_recipes, load_recipe, parse_set
from mpvg_kernels.train.distributed import EvalShardSampler, ShardedSampler
from mpvg_kernels.train.ema import ModelEma
from mpvg_kernels.train.schedule import WarmupCosine

# ------------------------------------------------------------------------------------------------------------------
# CLI and config


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    top = _help(capsys)
    for cmd in ("train", "eval", "predict", "demo"):
        assert cmd in top
    text = " ".join(_help(capsys, "train").split())
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in text, name
    for flag in ("--recipe", "--out", "--set", "--resume", "--stop-after-epoch", "--progress", "--threads"):
        assert flag in text
    assert text.count("(default:") >= len(FIELDS) + 7
    assert "runs/digits-mpvg" in text and "global batch" in text
    for cmd, flags in (("eval", ("--checkpoint", "--data", "--weights", "--json")),
                       ("predict", ("--checkpoint", "--topk", "--json"))):
        text = " ".join(_help(capsys, cmd).split())
        for flag in flags:
            assert flag in text
        n_opts = sum(1 for a in cli.build_parser()._subparsers._group_actions[0].choices[cmd]._actions
                     if a.option_strings and a.dest != "help")
        assert text.count("(default:") + text.count("(required)") >= n_opts


def test_commands_are_registered_by_module() -> None:
    import importlib

    for name in cli.COMMANDS:
        assert callable(importlib.import_module(name).add_parser)


def test_recipes_load_and_match_the_papers() -> None:
    assert {"digits", "deit_imagenet", "vit_lite_cifar100"} <= set(list_recipes())
    digits = build_config("digits")
    assert digits.model == "vit_digits" and digits.data == "digits" and digits.hflip == 0.0
    assert digits.mixup == digits.cutmix == 0.0 and digits.randaug_n == 0 and digits.reprob == 0.0
    deit = load_recipe("deit_imagenet")
    assert (deit["lr"], deit["lr_base_batch"], deit["weight_decay"], deit["epochs"], deit["warmup_epochs"]) == (
        5e-4, 512, 0.05, 300, 5)
    assert (deit["label_smoothing"], deit["mixup"], deit["cutmix"], deit["reprob"]) == (0.1, 0.8, 1.0, 0.25)
    assert (deit["randaug_n"], deit["randaug_m"], deit["model_kwargs"]["drop_path_rate"]) == (2, 9, 0.1)
    lite = load_recipe("vit_lite_cifar100")  # MPVG Table 7
    assert (lite["lr"], lite["weight_decay"], lite["batch_size"], lite["epochs"], lite["cooldown_epochs"],
            lite["warmup_epochs"]) == (6e-4, 0.06, 128, 310, 10, 10)


def test_zoo_recipes_match_the_papers_table_7() -> None:
    """MPVG Table 7 / LaPE Table 7 settings of every model family, and every recipe names a registered model."""
    from mpvg_kernels.models import list_models

    def key(r: dict, *names: str) -> tuple:
        return tuple(r[n] for n in names)

    sched = ("lr", "lr_base_batch", "min_lr", "weight_decay", "epochs", "cooldown_epochs", "warmup_epochs")
    swin = load_recipe("swin_imagenet")  # 5e-4 x 1024 / 512 = MPVG's 1e-3 at batch 1024
    assert key(swin, *sched) == (5e-4, 512, 5e-6, 0.05, 300, 0, 20) and swin["model_kwargs"]["drop_path_rate"] == 0.2
    assert key(load_recipe("ceit_imagenet"), *sched) == (5e-4, 512, 1e-5, 0.05, 300, 0, 5)
    t2t = load_recipe("t2t_imagenet")
    assert key(t2t, *sched) == (1e-3, None, 1e-5, 0.03, 310, 10, 10)
    ft = load_recipe("t2t_cifar100")  # MPVG Table 7: CIFAR-100 fine-tuning
    assert key(ft, "opt", "lr", "weight_decay", "batch_size", "epochs", "warmup_epochs") == (
        "sgd", 5e-2, 5e-4, 128, 60, 0)
    for name, lr in [("cvt_cifar100", 6e-4), ("cct_cifar100", 6e-4), ("vit_lite_cifar10", 5.5e-4),
                     ("cvt_cifar10", 5.5e-4), ("cct_cifar10", 5.5e-4)]:  # LaPE Table 7
        r = load_recipe(name)
        assert key(r, "lr", "weight_decay", "batch_size", "epochs", "cooldown_epochs", "warmup_epochs") == (
            lr, 0.06, 128, 310, 10, 10), name
    for recipe in list_recipes():
        assert build_config(recipe).model in list_models(), recipe


def test_overrides_precedence_and_errors(tmp_path: Path) -> None:
    cfg = build_config("digits", ["lr=5e-4", "betas=[0.9,0.95]", "model_kwargs.drop_path_rate=0.1", "epochs=7"],
                       {"epochs": 3})
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float) and cfg.betas == [0.9, 0.95]
    assert cfg.model_kwargs == {"drop_path_rate": 0.1} and cfg.epochs == 3  # the flag wins over --set
    assert build_config("digits", ["clip_grad=none"]).clip_grad is None
    with pytest.raises(UserError, match="unknown config key 'lrr'; did you mean lr"):
        parse_set(["lrr=1"])
    with pytest.raises(UserError, match="--set epochs: 'many' is not a valid int"):
        build_config("digits", ["epochs=many"])
    with pytest.raises(UserError, match="--set pe: 'xyz' is not one of"):
        build_config("digits", ["pe=xyz"])
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        build_config("nope")
    bad = tmp_path / "r.yaml"
    bad.write_text("lr: 1e-3\nwarmup: 5\n")
    with pytest.raises(UserError, match=r"r\.yaml: unknown config key 'warmup'"):
        build_config(str(bad))
    bad.write_text("epochs: 2\nwarmup_epochs: -1\n")
    with pytest.raises(UserError, match="warmup_epochs"):
        build_config(str(bad))
    good = tmp_path / "g.yaml"
    good.write_text("lr: 1e-3\nepochs: 2\n")  # YAML 1.1 reads 1e-3 as a string: coerced to float
    assert build_config(str(good)).lr == 1e-3


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = cli.main(["train", "--model", "resnet50", "--out", str(tmp_path / "x"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "mpvg train: error: unknown model 'resnet50'; available models:" in err
    assert "vit_digits" in err and "Traceback" not in err
    rc = cli.main(["train", "--data", f"cifar10:{tmp_path / 'none'}", "--out", str(tmp_path / "y")])
    assert rc == 2 and "cifar-10-batches-py" in capsys.readouterr().err
    rc = cli.main(["eval", "--checkpoint", str(tmp_path / "missing.pt")])
    assert rc == 2 and "checkpoint not found" in capsys.readouterr().err
    rc = cli.main(["train", "--print-config", "--epochs", "4"])
    assert rc == 0 and "epochs: 4" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# augmentation


def test_mixup_cutmix_soft_targets() -> None:
    torch.manual_seed(0)
    y = torch.tensor([0, 1, 2, 3])
    t = smooth_one_hot(y, 5, 0.1)
    assert torch.allclose(t.sum(1), torch.ones(4)) and math.isclose(float(t[0, 0]), 0.92, rel_tol=1e-6)
    for mix, cut in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        m = MixupCutmix(mix, cut, 1.0, 0.5, 5, 0.1)
        x = torch.rand(4, 3, 8, 8)
        xm, tm = m(x, y)
        assert xm.shape == x.shape and tm.shape == (4, 5) and torch.allclose(tm.sum(1), torch.ones(4))
        assert not torch.equal(tm, t)  # mixed with the reversed batch
    loss = classification_loss(torch.randn(4, 5), tm, 0.1)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_train_transform_shapes_and_switch() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TrainConfig(), rrc_scale=[0.5, 1.0], hflip=0.5, randaug_n=2, reprob=0.5, mixup=0.8,
                              cutmix=1.0, affine_degrees=5.0)
    tf = TrainTransform(cfg, (24, 24), 3, 10, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))
    xa, ta = tf(x, y)
    assert xa.shape == (16, 3, 24, 24) and xa.dtype == torch.float32 and ta.shape == (16, 10)
    off = TrainTransform(dataclasses.replace(cfg, augment=False), (24, 24), 3, 10, (0.5,), (0.25,))
    x0, t0 = off(x, y)
    ev = EvalTransform((24, 24), 3, (0.5,), (0.25,))
    assert torch.equal(t0, y) and torch.allclose(x0, ev(x))
    digits = TrainTransform(build_config("digits"), (16, 16), 1, 10, (0.3,), (0.4,))
    assert not any("Flip" in type(m).__name__ for m in digits.modules())


# ------------------------------------------------------------------------------------------------------------------
# schedule, EMA, samplers


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, peak_lr=1e-3, total_steps=100, warmup_steps=10, cooldown_steps=10, warmup_lr=1e-6,
                     min_lr=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert s.lr_at(5) == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5)
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(50) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr_at(90) == pytest.approx(1e-5) and s.lr_at(99) == pytest.approx(1e-5)
    for _ in range(37):
        s.step()
    s2 = WarmupCosine(opt, 1e-3, 100, 10, 10, 1e-6, 1e-5)
    s2.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(s.lr_at(37))


def test_warmup_cosine_is_a_torch_scheduler() -> None:
    """A torch LRScheduler with list get_last_lr(); the values are those of the hand-written schedule it replaced
    (computed with it and hard-coded here), bit for bit, also after a state-dict round trip."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    s = WarmupCosine(opt, peak_lr=1e-3, total_steps=100, warmup_steps=10, cooldown_steps=10, warmup_lr=1e-6,
                     min_lr=1e-5)
    assert isinstance(s, torch.optim.lr_scheduler.LRScheduler)
    expected = {0: 1e-06, 1: 0.00010090000000000001, 5: 0.0005005000000000001, 9: 0.0009001000000000001,
                10: 0.001, 11: 0.000999618372939158, 37: 0.0007468675145409927, 50: 0.000505,
                79: 5.546912895658472e-05, 80: 4.7679631406913064e-05, 89: 1.0381627060842164e-05, 90: 1e-05,
                99: 1e-05, 100: 1e-05}
    seen = {}
    for step in range(101):
        last = s.get_last_lr()
        assert isinstance(last, list) and len(last) == 1 and last[0] == opt.param_groups[0]["lr"]
        if step in expected:
            seen[step] = last[0]
        p.grad = torch.zeros(1)
        opt.step()
        s.step()
    assert seen == expected
    odd = WarmupCosine(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 0.0007, 330, 33, 7)
    assert [odd.lr_at(i) for i in (0, 17, 33, 200, 329)] == [1e-06, 0.0003610909090909091, 0.0007,
                                                             0.0002735531092044871, 1e-05]
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s2 = WarmupCosine(opt2, 1e-3, 100, 10, 10, 1e-6, 1e-5)
    s2.load_state_dict({"step_count": 37})  # the state dict the hand-written schedule saved
    assert s2.get_last_lr() == [expected[37]] and opt2.param_groups[0]["lr"] == expected[37]
    s2.load_state_dict(s.state_dict())
    assert s2.get_last_lr() == [1e-05] and s2.last_epoch == 101


def test_ema_tracks_weights() -> None:
    m = torch.nn.Linear(3, 2)
    ema = ModelEma(m, decay=0.5, warmup=False)
    with torch.no_grad():
        m.weight.add_(1.0)
    before = ema.module.weight.clone()
    ema.update(m)
    assert torch.allclose(ema.module.weight, 0.5 * before + 0.5 * m.weight)
    e2 = ModelEma(m, decay=0.5)
    e2.load_state_dict(ema.state_dict())
    assert torch.equal(e2.module.weight, ema.module.weight) and e2.updates == 1


def test_ema_decay_warmup_and_averaged_model() -> None:
    m = torch.nn.Linear(3, 2)
    ema = ModelEma(m, decay=0.9)
    assert isinstance(ema.averaged, torch.optim.swa_utils.AveragedModel) and ema.module is ema.averaged.module
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    expected = [t.detach().clone() for t in (m.weight, m.bias)]
    for k in range(4):
        with torch.no_grad():
            m.weight.mul_(1.5).add_(0.25)
            m.bias.sub_(0.5)
        d = min(0.9, (1 + k) / (10 + k))
        assert ema.current_decay() == d
        ema.update(m)
        expected = [d * e + (1 - d) * w for e, w in zip(expected, (m.weight, m.bias), strict=True)]
        assert torch.allclose(ema.module.weight, expected[0]) and torch.allclose(ema.module.bias, expected[1])
    assert ema.updates == 4 and int(ema.averaged.n_averaged) == 5
    e2 = ModelEma(torch.nn.Linear(3, 2), decay=0.9)
    e2.load_state_dict(ema.state_dict())
    assert e2.current_decay() == ema.current_decay() and int(e2.averaged.n_averaged) == 5
    assert set(ema.state_dict()["state_dict"]) == {"weight", "bias"}  # the plain model's keys


def test_plot_curves_draws_the_logged_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    from mpvg_kernels.train.metrics import plot_curves

    labels: list[str] = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        labels.append(kwargs.get("label", ""))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    ema_records = [{"epoch": e, "train_loss": 2.0 / e, "lr": 1e-3, "top1": 50.0 + e, "top5": 90.0,
                    "eval_loss": 1.0 / e, "top1_raw": 49.0 + e, "top5_raw": 89.0, "eval_loss_raw": 1.1 / e}
                   for e in (1, 2)]
    plot_curves(ema_records, tmp_path / "ema.png")
    assert labels == ["train", "held-out (EMA)", "held-out (raw weights)", "top-1 (EMA)", "top-5 (EMA)",
                      "top-1 (raw weights)", ""]
    labels.clear()
    plot_curves([{k: v for k, v in r.items() if "raw" not in k} for r in ema_records], tmp_path / "plain.png")
    assert labels == ["train", "held-out", "top-1", "top-5", ""]
    assert (tmp_path / "ema.png").stat().st_size > 0 and (tmp_path / "plain.png").stat().st_size > 0


def test_sharded_sampler_matches_single_process_batches() -> None:
    n, b, world = 23, 4, 2
    single = ShardedSampler(n, 1, 0, seed=3)
    ranks = [ShardedSampler(n, world, r, seed=3) for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(5)
    order = list(single)
    per_rank = [list(s) for s in ranks]
    for i in range(n // (b * world)):  # global batch i == union of the ranks' batch i
        glob = sorted(order[i * b * world:(i + 1) * b * world])
        assert glob == sorted(sum((r[i * b:(i + 1) * b] for r in per_rank), []))
    single.set_epoch(6)
    assert list(single) != order
    rep = ShardedSampler(12, 2, 0, seed=0, repeats=3)
    assert len(list(rep)) == 6
    shards = [list(EvalShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))


# ------------------------------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    import numpy as np

    C.seed_all(1)
    state = C.capture_rng()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    model = C.build_model("vit_digits", "mpvg", 10)
    path = tmp_path / "c.pt"
    C.save_checkpoint(path, {"model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": 10},
                             "data": {}, "config": {}, "epoch": 1, "state_dict": model.state_dict(),
                             "rng": [state]})
    ck = torch.load(path, weights_only=True)  # plain tensors and containers only
    C.restore_rng(ck["rng"][0])
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    rebuilt = C.model_from_checkpoint(C.load_checkpoint(path))
    assert C.weights_digest(rebuilt) == C.weights_digest(model)


def test_checkpoint_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 garbage garbage")
    with pytest.raises(UserError, match=r"cannot load checkpoint .*corrupt\.pt: the file is corrupt"):
        C.load_checkpoint(corrupt)
    good = tmp_path / "good.pt"
    model = C.build_model("vit_digits", "mpvg", 10)
    C.save_checkpoint(good, {"model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": 10},
                             "data": {}, "config": {}, "epoch": 1, "state_dict": model.state_dict()})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UserError, match="corrupt, truncated"):
        C.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(UserError, match="not an mpvg-kernels checkpoint"):
        C.load_checkpoint(foreign)
    ck = C.load_checkpoint(good)
    ck["model"]["pe"] = "default"  # a checkpoint whose weights do not fit the model it names
    with pytest.raises(UserError, match="does not match the model: missing .* unexpected .*pos_weight"):
        C.model_from_checkpoint(ck)
    ck["model"] = {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": 7}
    with pytest.raises(UserError, match="shape mismatches"):
        C.model_from_checkpoint(ck)
    ck["model"]["name"] = "vit_huge"
    with pytest.raises(UserError, match="unknown model 'vit_huge'"):
        C.model_from_checkpoint(ck)
    with pytest.raises(UserError, match="no EMA weights"):
        C.model_from_checkpoint(C.load_checkpoint(good), weights="ema")


def test_evaluate_checkpoint_and_predict_images_as_library_calls(tmp_path: Path) -> None:
    from PIL import Image

    from mpvg_kernels.data import digits_split
    from mpvg_kernels.train.evaluate import evaluate_checkpoint
    from mpvg_kernels.train.predict import predict_images

    model = C.build_model("vit_digits", "mpvg", 10)
    path = tmp_path / "c.pt"
    C.save_checkpoint(path, {
        "model": {"name": "vit_digits", "pe": "mpvg", "kwargs": {}, "num_classes": 10},
        "data": {"spec": "digits", "classes": [str(i) for i in range(10)], "in_chans": 1, "input_size": [16, 16],
                 "mean": [0.3053], "std": [0.376], "crop_pct": 1.0, "eval_resize": "full"},
        "config": {}, "epoch": 1, "state_dict": model.state_dict()})
    r = evaluate_checkpoint(path, batch_size=100)
    assert r["images"] == 360 and r["split"] == "test" and r["data"] == "digits" and r["weights"] == "model"
    assert r["checkpoint"] == str(path) and r["epoch"] == 1 and 0.0 <= r["top1"] <= r["top5"] <= 100.0
    with pytest.raises(UserError, match="no EMA weights"):
        evaluate_checkpoint(path, weights="ema")
    with pytest.raises(UserError, match="amp must be one of"):
        evaluate_checkpoint(path, amp="fp8")
    images, _, _, test_idx = digits_split()
    png = tmp_path / "d.png"
    Image.fromarray(images[test_idx[0]]).save(png)
    out = predict_images(path, [png], topk=3)
    assert [o["image"] for o in out] == [str(png)] and len(out[0]["top"]) == 3


# ------------------------------------------------------------------------------------------------------------------
# training smoke runs on the on-disk formats (tiny data, one epoch)


def test_train_eval_on_cifar_and_folder_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from test_data import write_cifar10, write_folder

    cifar = write_cifar10(tmp_path / "c")
    out = tmp_path / "run-cifar"
    common = ["--epochs", "1", "--batch-size", "8", "--no-progress", "--threads", "1"]
    assert cli.main(["train", "--data", f"cifar10:{cifar}", "--out", str(out), *common]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_classes"] == 10 and s["eval_images"] == 7 and s["data"] == f"cifar10:{cifar}"
    assert "converting RGB to gray" in capsys.readouterr().out  # vit_digits has in_chans=1
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 7

    root = write_folder(tmp_path / "f")
    out = tmp_path / "run-folder"
    args = ["train", "--data", f"folder:{root}", "--out", str(out), "--num-workers", "1", "--rrc-scale", "0.5", "1",
            *common]
    assert cli.main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["num_classes"] == 3 and s["eval_images"] == 6 and s["eval_split"] == "val"
    capsys.readouterr()
    img = next((root / "val" / "cat").glob("*.png"))
    assert cli.main(["predict", "--checkpoint", str(out / "checkpoint.pt"), "--json", str(img)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in ("cat", "dog", "eel")

    (root / "train" / "dog" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert cli.main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "corrupt.jpg" in err and "Traceback" not in err
