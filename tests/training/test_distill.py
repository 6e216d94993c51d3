"""Distillation: losses against hand computations, the distillation token, the teacher."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import randomize_

import cait
from cait.models import InputSpec
from cait.training.losses import DistillationLoss, hard_distillation, soft_distillation
from cait.training.teacher import load_teacher

S = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])  # student logits, 2 samples x 3 classes
T = torch.tensor([[1.0, 3.0, 0.0], [0.0, -1.0, 2.0]])  # teacher logits
Y = torch.tensor([0, 2])


def _log_softmax(row, tau=1.0):
    z = [v / tau for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def test_soft_loss_equals_hand_computation():
    tau = 2.0
    total = 0.0
    for s, t in zip(S.tolist(), T.tolist(), strict=True):
        ls, lt = _log_softmax(s, tau), _log_softmax(t, tau)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    per_sample = total / 2 * tau * tau
    assert soft_distillation(S, T, tau).item() == pytest.approx(per_sample, rel=1e-6)
    legacy = soft_distillation(S, T, tau, "deit_legacy").item()
    assert legacy == pytest.approx(per_sample / 3, rel=1e-6)  # differs by the class count


def test_hard_loss_ignores_teacher_confidence():
    expected = -(_log_softmax(S[0].tolist())[1] + _log_softmax(S[1].tolist())[2]) / 2
    assert hard_distillation(S, T).item() == pytest.approx(expected, rel=1e-6)
    sharper = T * 10  # same argmax, far more confident
    assert hard_distillation(S, sharper).item() == pytest.approx(expected, rel=1e-6)


def test_total_is_the_weighted_sum_and_alpha_zero_is_the_base_loss():
    base = torch.nn.functional.cross_entropy(S, Y).item()
    out = DistillationLoss("hard", alpha=0.3)((S, S + 1), Y, T)
    assert out.base.item() == pytest.approx(base, rel=1e-6)
    assert out.distill.item() == pytest.approx(hard_distillation(S + 1, T).item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(0.7 * base + 0.3 * out.distill.item(), rel=1e-6)
    zero = DistillationLoss("soft", alpha=0.0, tau=3.0)(S, Y, T)
    assert zero.loss.item() == pytest.approx(base, rel=1e-6)
    plain = DistillationLoss("soft", alpha=0.5)(S, Y, T)  # no dist token: same logits
    assert plain.distill.item() == pytest.approx(soft_distillation(S, T, 1.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):
        DistillationLoss("hard")(S, Y)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss("hard", alpha=1.5)


TINY = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=5)


@pytest.mark.parametrize("position", ["late", "early"])
def test_distilled_model_tuple_in_training_mean_in_eval(position):
    """timm's semantics: the pair only in training after set_distilled_training(), the mean
    of both heads otherwise; pre-logits are the mean of both tokens."""
    ca = 2 if position == "late" else 0
    model = cait.CaiT(cait.CaiTConfig(**TINY, distilled=True, class_token=position, ca_depth=ca))
    x = torch.randn(3, 3, 16, 16)
    assert model.train()(x).shape == (3, 5)  # not asked for the pair
    model.set_distilled_training(True)
    cls, dist = model.train()(x)
    assert cls.shape == dist.shape == (3, 5)
    model.eval()
    with torch.no_grad():
        cls, dist = model.train()(x)
        mean = model.eval()(x)
        torch.testing.assert_close(mean, (cls + dist) / 2)
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, (tokens[:, 0] + tokens[:, 1]) / 2)
        inter = model.forward_trace(x)
    torch.testing.assert_close(inter.logits, mean, atol=1e-5, rtol=1e-5)
    if position == "late":
        assert inter.ca[0].attn.shape == (3, 2, 2, 18)  # cls and dist query [cls, dist, patches]


def test_both_tokens_get_gradients():
    model = cait.CaiT(cait.CaiTConfig(**TINY, distilled=True, init_scale=0.5)).train()
    model.set_distilled_training(True)
    cls, dist = model(torch.randn(2, 3, 16, 16))
    loss = DistillationLoss("hard")((cls, dist), torch.tensor([0, 1]), torch.randn(2, 5))
    loss.loss.backward()
    for name in ("cls_token", "dist_token", "head.weight", "head_dist.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_official_weights_load_strictly_plain_and_initialise_the_dist_token(caplog):
    plain = cait.CaiT(cait.CaiTConfig(**TINY))
    official = {"model": {"module." + k: v for k, v in plain.state_dict().items()}}
    cait.load_pretrained(cait.CaiT(cait.CaiTConfig(**TINY)), official)
    distilled = cait.CaiT(cait.CaiTConfig(**TINY, distilled=True))
    with caplog.at_level("INFO", logger="cait.models.pretrained"):
        report = cait.load_pretrained(distilled, official)
    assert report.initialised_dist_token and "dist_token initialised from cls_token" in caplog.text
    torch.testing.assert_close(distilled.dist_token, plain.cls_token)
    torch.testing.assert_close(distilled.head_dist.weight, plain.head.weight)
    x = torch.randn(2, 3, 16, 16)
    with (
        torch.no_grad()
    ):  # with identical tokens and heads, the distilled model equals the plain one
        torch.testing.assert_close(distilled.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)


def test_deit_distilled_matches_timm_in_both_modes():
    ref = randomize_(timm.create_model("deit_tiny_distilled_patch16_224"))
    model = cait.create_model("deit_tiny_distilled_patch16_224")
    cait.load_pretrained(model, ref.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), atol=1e-4, rtol=0)
        # training mode without set_distilled_training: the mean, as timm gives it
        torch.testing.assert_close(model.train()(x), ref.train()(x), atol=1e-4, rtol=0)
        for m in (model, ref):
            m.set_distilled_training(True)
        for ours, theirs in zip(model.train()(x), ref.train()(x), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        features = model.eval().forward_features(x)
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True),
            ref.eval().forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-4,
            rtol=0,
        )


def test_teacher_errors_before_training(tmp_path):
    settings = InputSpec(16, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=r"needs a weights file \(distill.teacher_weights\)"):
        load_teacher("timm:resnet10t", 10, settings)
    weights = tmp_path / "r10.pth"
    torch.save(timm.create_model("resnet10t", num_classes=7).state_dict(), weights)
    with pytest.raises(ValueError, match="do not fit"):
        load_teacher("timm:resnet10t", 10, settings, str(weights))
    teacher = load_teacher("timm:resnet10t", 7, settings, str(weights))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training  # stays frozen in eval mode
    # its own normalisation: student-normalised zeros are grey 0.5, ImageNet-normalised here
    x = torch.zeros(1, 3, 16, 16)
    expected = (0.5 - torch.tensor(cait.models.registry.IMAGENET_MEAN)) / torch.tensor(
        cait.models.registry.IMAGENET_STD
    )
    torch.testing.assert_close((x * teacher.scale + teacher.shift)[0, :, 0, 0], expected)


def test_teacher_then_distilled_student_through_the_cli(tmp_path, capsys):
    """A timm convnet teacher trained on the digits, then a distilled CaiT student."""
    from cait.cli import main as cli_main
    from cait.training.checkpoint import load_checkpoint

    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    common = [
        "--data",
        "digits",
        "--epochs",
        "1",
        "--no-progress",
        "--set",
        "tensorboard=false",
        "--set",
        "augment.auto_augment=null",
        "--set",
        "augment.mixup=0",
        "--set",
        "augment.cutmix=0",
        "--set",
        "augment.repeated_aug=1",
    ]
    assert (
        cli_main(
            [
                "train",
                "--model",
                "timm:resnet10t",
                "--output",
                str(teacher_dir),
                "--set",
                "data.img_size=32",
                "--set",
                "data.mean=[0.5,0.5,0.5]",
                "--set",
                "data.std=[0.5,0.5,0.5]",
                *common,
            ]
        )
        == 0
    )
    assert (teacher_dir / "model.safetensors").is_file()
    assert (
        cli_main(
            [
                "train",
                "--model",
                "cait_digits_16",
                "--output",
                str(student_dir),
                "--set",
                "model_args.depth=2",
                "--set",
                "model_args.distilled=true",
                "--teacher",
                str(teacher_dir / "model.safetensors"),
                "--distillation",
                "hard",
                "--distill-alpha",
                "0.5",
                *common,
            ]
        )
        == 0
    )
    state = load_checkpoint(student_dir / "last.pt")
    assert state.run["config"]["distill"]["kind"] == "hard"
    assert "dist_token" in state.weights and "head_dist.weight" in state.weights
    assert (student_dir / "metrics.jsonl").read_text().count("\n") == 1
    capsys.readouterr()
    # a teacher for another number of classes is refused before any training step
    seven = tmp_path / "seven.pth"
    torch.save(timm.create_model("resnet10t", num_classes=7).state_dict(), seven)
    assert (
        cli_main(
            [
                "train",
                "--model",
                "cait_digits_16",
                "--output",
                str(tmp_path / "x"),
                "--teacher",
                "timm:resnet10t",
                "--teacher-weights",
                str(seven),
                "--distillation",
                "hard",
                "--set",
                "model_args.depth=2",
                *common,
            ]
        )
        == 2
    )
    assert "do not fit timm:resnet10t" in capsys.readouterr().err
    assert not (tmp_path / "x" / "last.pt").exists()


def test_torchvision_teacher(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    settings = InputSpec(32, 1.0, "bicubic", (0.5,) * 3, (0.5,) * 3)
    teacher = load_teacher("torchvision:resnet18", 10, settings, str(weights))
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        load_teacher("torchvision:resnet_nope", 10, settings, str(weights))
