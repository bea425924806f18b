"""Attacks: differential tests against torchattacks and foolbox, sanity checks, guard rails."""

from __future__ import annotations

import logging

import foolbox
import pytest
import timm
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from synclone.errors import UserError
from synclone.probes import adversarial as adv
from synclone.probes.adversarial import autoattack, fgsm, pgd, robust_accuracy, robust_flags
from synclone.util.seeds import attack_seeds


class Normalised(nn.Module):
    """Takes pixels in [0, 1], normalises inside, as synclone models do."""

    def __init__(self, net: nn.Module, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class TinyCNN(nn.Module):
    """For 16x16 inputs. Flattening (not global pooling) keeps random-init decisions input-dependent,
    so small budgets fool some images and not others."""

    def __init__(self, n_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(16 * 8 * 8, n_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(1)
        return self.fc(self.drop(x))


def make_model(kind: str = "cnn", n_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    if kind == "timm":
        net = timm.create_model("test_resnet", num_classes=n_classes, pretrained=False)
        return Normalised(net, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).eval()
    model = Normalised(TinyCNN(n_classes, dropout))
    # Non-trivial batch-norm statistics, so eval and train mode really differ.
    model.net.bn.running_mean.uniform_(-0.5, 0.5)
    model.net.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_images(n: int = 24, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # 8-bit grey levels, as decoded images are; includes exact 0 and 1 so the clamps bind.
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def predicted(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).argmax(1)


@pytest.fixture(scope="module")
def cnn():
    return make_model("cnn")


@pytest.fixture(scope="module")
def data(cnn):
    images = make_images()
    g = torch.Generator().manual_seed(2)
    return images, torch.randint(0, 10, (len(images),), generator=g)


# --------------------------------------------------------------------------- bit-for-bit equality


@pytest.mark.parametrize(("kind", "eps"), [("cnn", 1 / 255), ("cnn", 8 / 255), ("timm", 4 / 255)])
def test_fgsm_equals_torchattacks_and_foolbox(kind, eps):
    model = make_model(kind)
    images = make_images(16, 32 if kind == "timm" else 16)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    ours = fgsm(model, images, labels, eps)
    theirs = torchattacks.FGSM(model, eps=eps)(images, labels)
    raw, clipped, _ = foolbox.attacks.FGSM()(foolbox.PyTorchModel(model, bounds=(0, 1)), images, labels, epsilons=eps)
    assert not torch.equal(ours, images)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, raw)
    assert torch.equal(ours, clipped)


@pytest.mark.parametrize(
    ("kind", "eps", "alpha"),
    [("cnn", 8 / 255, 2 / 255), ("cnn", 4 / 255, 1 / 255), ("cnn", 0.1, 0.03), ("timm", 8 / 255, 2 / 255)],
)
def test_pgd_linf_equals_torchattacks_and_foolbox(kind, eps, alpha):
    model = make_model(kind)
    images = make_images(16, 32 if kind == "timm" else 16)
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    steps = 4 if kind == "timm" else 10
    ours = pgd(model, images, labels, eps, alpha=alpha, steps=steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(images, labels)
    fb_attack = foolbox.attacks.LinfPGD(abs_stepsize=alpha, steps=steps, random_start=False)
    raw, clipped, _ = fb_attack(foolbox.PyTorchModel(model, bounds=(0, 1)), images, labels, epsilons=eps)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, raw)
    assert torch.equal(ours, clipped)


def foolbox_l2_arithmetic(model, x0, labels, eps, alpha, steps):
    """L2 PGD written with foolbox 3.3's float32 arithmetic (gradient_descent_base.py), to pin down
    why it differs from torchattacks/ours in the last bits."""
    x = x0
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x), labels, reduction="none").sum()  # summed, not mean, loss
        (grad,) = torch.autograd.grad(loss, x)
        norms = grad.flatten(1).square().sum(-1).sqrt()  # eagerpy's l2 norm, not torch.norm
        grad = grad * (1 / torch.clamp(norms, min=1e-12)).view(-1, 1, 1, 1)  # times reciprocal, guard 1e-12
        x = x.detach() + alpha * grad
        delta = x - x0
        norms = torch.clamp(delta.flatten(1).square().sum(-1).sqrt(), min=1e-12)
        x = torch.clamp(x0 + delta * torch.clamp(eps / norms, max=1).view(-1, 1, 1, 1), 0, 1)
    return x


@pytest.mark.parametrize("eps", [0.25, 1.0])
def test_pgd_l2_equals_torchattacks_and_foolbox_up_to_its_arithmetic(cnn, data, eps):
    images, labels = data
    alpha = eps / 4
    ours = pgd(cnn, images, labels, eps, norm="l2", alpha=alpha, steps=10, random_start=False)
    theirs = torchattacks.PGDL2(cnn, eps=eps, alpha=alpha, steps=10, random_start=False)(images, labels)
    assert torch.equal(ours, theirs)
    # foolbox's L2 PGD is the same algorithm in different float32 arithmetic: it differentiates the
    # summed (not mean) cross-entropy, computes norms as sqrt(sum(g**2)) (not torch.norm's kernel) and
    # normalises by multiplying with 1 / max(norm, 1e-12) (not dividing by norm + 1e-10). Each of the
    # three alone changes the last bits; the replica with all three equals foolbox bit for bit.
    fb_attack = foolbox.attacks.L2PGD(abs_stepsize=alpha, steps=10, random_start=False)
    raw, _, _ = fb_attack(foolbox.PyTorchModel(cnn, bounds=(0, 1)), images, labels, epsilons=eps)
    assert torch.equal(foolbox_l2_arithmetic(cnn, images, labels, eps, alpha, 10), raw)
    assert not torch.equal(ours, raw)
    assert (ours - raw).abs().max().item() <= 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_from_global_rng_equals_torchattacks(cnn, data, norm):
    images, labels = data
    eps = 8 / 255 if norm == "linf" else 0.5
    torch.manual_seed(123)
    ours = pgd(cnn, images, labels, eps, norm=norm, alpha=eps / 4, steps=3, random_start=True, seed=None)
    torch.manual_seed(123)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = cls(cnn, eps=eps, alpha=eps / 4, steps=3, random_start=True)(images, labels)
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------- sanity


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_perturbation_stays_in_budget_and_in_pixel_range(cnn, data, norm, random_start):
    images, labels = data
    eps = 4 / 255 if norm == "linf" else 0.3
    out = pgd(cnn, images, labels, eps, norm=norm, steps=8, random_start=random_start, seed=0)
    delta = (out - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max().item() <= eps + 1e-6
    assert size.max().item() > 0.5 * eps  # the attack moved
    assert out.min().item() >= 0 and out.max().item() <= 1


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_l2"])
def test_robust_accuracy_at_most_clean(cnn, data, attack):
    images, labels = data
    labels = predicted(cnn, images)
    labels[::3] = (labels[::3] + 1) % 10  # a third wrong: clean accuracy 2/3
    eps_list = [0.0, 1 / 255, 4 / 255] if attack != "pgd_l2" else [0.0, 0.1, 0.5]
    acc = robust_accuracy(cnn, images, labels, attack, eps_list, batch_size=10)
    clean = (predicted(cnn, images) == labels).float().mean().item()
    assert acc[0.0] == pytest.approx(clean)
    assert all(a <= clean for a in acc.values())
    assert min(acc.values()) < clean  # the budgets are big enough to fool some images


def test_autoattack_at_most_pgd():
    model = make_model("cnn")
    images = make_images(16)
    labels = predicted(model, images)
    eps = 2 / 255
    pgd_acc = robust_accuracy(model, images, labels, "pgd", [eps], steps=10)[eps]
    # A fast configuration: APGD-CE and APGD-T, 5 iterations, one restart.
    fast = dict(version="custom", attacks=["apgd-ce", "apgd-t"], n_iter=5, n_restarts=1)
    aa_acc = robust_accuracy(model, images, labels, "autoattack", [eps], **fast)[eps]
    assert 0 < pgd_acc < 1  # eps neither trivial nor overwhelming, so the comparison says something
    assert aa_acc <= pgd_acc


@pytest.mark.parametrize(("norm", "eps"), [("linf", 2 / 255), ("l2", 0.5)])
def test_autoattack_standard_version_on_few_classes_stays_in_budget(norm, eps):
    # The standard ensemble (APGD-CE, APGD-T, FAB-T, Square) with 9 target classes, capped for 4 classes.
    model = make_model("cnn", n_classes=4)
    images = make_images(6)
    labels = predicted(model, images)
    out = autoattack(model, images, labels, eps, norm=norm, n_iter=3, n_queries=10)
    delta = (out - images).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max().item() <= eps + 1e-6
    assert (predicted(model, out) != labels).any()


def test_autoattack_leaves_global_rng_alone(cnn, data):
    images, labels = data
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    autoattack(cnn, images[:4], labels[:4], 1 / 255, version="custom", attacks=["apgd-ce"], n_iter=2)
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- determinism, restarts, iterates


def test_seeded_random_starts_are_deterministic_and_independent_of_batch_size(cnn, data):
    images, labels = data
    labels = predicted(cnn, images)
    eps = [2 / 255, 4 / 255]
    a = robust_flags(cnn, images, labels, "pgd", eps, steps=3, seed=5, batch_size=24)
    b = robust_flags(cnn, images, labels, "pgd", eps, steps=3, seed=5, batch_size=24)
    c = robust_flags(cnn, images, labels, "pgd", eps, steps=3, seed=5, batch_size=7)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    seeds = attack_seeds(5, 0, len(images))
    x1 = pgd(cnn, images, labels, eps[0], steps=2, seed=seeds)
    x2 = pgd(cnn, images, labels, eps[0], steps=2, seed=seeds)
    x3 = pgd(cnn, images, labels, eps[0], steps=2, seed=attack_seeds(6, 0, len(images)))
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    # Image i's start does not depend on the other images in the batch.
    x4 = pgd(cnn, images[5:9], labels[5:9], eps[0], steps=1, alpha=1e-12, seed=seeds[5:9])
    x5 = pgd(cnn, images, labels, eps[0], steps=1, alpha=1e-12, seed=seeds)[5:9]
    assert torch.equal(x4, x5)


def test_restarts_keep_the_first_fooling_restart(cnn, data):
    images, labels = data
    labels = predicted(cnn, images)
    seeds = attack_seeds(0, 0, len(images))
    # A random-init net is nearly linear around each image, so full-size steps end in the same place
    # from any start; one small step makes the outcome depend on the random start, as restarts need.
    eps, kw = 16 / 255, dict(steps=1, alpha=0.5 / 255, seed=seeds)
    one = pgd(cnn, images, labels, eps, restarts=1, **kw)
    many = pgd(cnn, images, labels, eps, restarts=5, **kw)
    fooled_one = predicted(cnn, one) != labels
    fooled_many = predicted(cnn, many) != labels
    assert 0 < fooled_one.sum() < len(images)
    assert torch.all(fooled_many >= fooled_one)  # later restarts only add fooled images
    assert fooled_many.sum() > fooled_one.sum()
    # Images the first restart fooled keep exactly that restart's result.
    assert torch.equal(many[fooled_one], one[fooled_one])


def test_first_fooling_iterate_fools_at_least_where_last_does(cnn, data):
    images, labels = data
    labels = predicted(cnn, images)
    eps = 3 / 255
    last = pgd(cnn, images, labels, eps, steps=6, random_start=False)
    first = pgd(cnn, images, labels, eps, steps=6, random_start=False, iterate="first_fooling")
    fooled_last = predicted(cnn, last) != labels
    fooled_first = predicted(cnn, first) != labels
    assert torch.all(fooled_first >= fooled_last)
    assert not torch.equal(first, last)  # some image was fooled before the last step
    assert (first - images).abs().max().item() <= eps + 1e-6


def test_clean_predictions_skip_images_already_wrong(cnn, data):
    images, labels = data
    labels = predicted(cnn, images)
    seen = []

    def spy(model, x, y, eps):
        seen.append(len(x))
        return fgsm(model, x, y, eps)

    # The shared clean pass says images 0-5 are wrong: they must count as not robust, unattacked.
    clean_logits = F.one_hot(labels, 10).float()
    clean_logits[:6] = F.one_hot((labels[:6] + 1) % 10, 10).float()
    flags = robust_flags(cnn, images, labels, spy, [0.0, 1 / 255], clean=clean_logits, batch_size=12)
    assert seen == [6, 12]
    assert not flags[:, :6].any()
    assert flags[0, 6:].all()
    by_label = robust_flags(cnn, images, labels, spy, [1 / 255], clean=clean_logits.argmax(1), batch_size=12)
    assert torch.equal(by_label[0], flags[1])
    with pytest.raises(UserError, match="one per image"):
        robust_flags(cnn, images, labels, "fgsm", [1 / 255], clean=clean_logits[:10])


def test_robust_accuracy_accepts_batches(cnn, data):
    images, labels = data
    batches = [(images[i : i + 5], labels[i : i + 5]) for i in range(0, len(images), 5)]
    a = robust_accuracy(cnn, batches, None, "pgd", [2 / 255], steps=2, seed=1)
    b = robust_accuracy(cnn, images, labels, "pgd", [2 / 255], steps=2, seed=1, batch_size=5)
    assert a == b


# --------------------------------------------------------------------------- guard rails


def test_bad_input_is_a_user_error(cnn, data):
    images, labels = data
    with pytest.raises(UserError, match="eps"):
        pgd(cnn, images, labels, -0.1)
    with pytest.raises(UserError, match="eps"):
        robust_accuracy(cnn, images, labels, "fgsm", [0.0, -1 / 255])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        pgd(cnn, images * 2 - 1, labels, 1 / 255)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        autoattack(cnn, images * 255, labels, 1 / 255)
    with pytest.raises(UserError, match="steps"):
        pgd(cnn, images, labels, 1 / 255, steps=0)
    with pytest.raises(UserError, match="unknown norm 'l1'"):
        pgd(cnn, images, labels, 1 / 255, norm="l1")
    with pytest.raises(UserError, match="random_start"):
        pgd(cnn, images, labels, 1 / 255, restarts=3, random_start=False)
    with pytest.raises(UserError, match="unknown attack 'cw'"):
        robust_accuracy(cnn, images, labels, "cw", [1 / 255])
    with pytest.raises(UserError, match="class indices"):
        pgd(cnn, images, labels + 10, 1 / 255)
    with pytest.raises(UserError, match="custom"):
        autoattack(cnn, images, labels, 1 / 255, attacks=["apgd-ce"])


def test_train_mode_is_corrected_logged_and_restored(data, caplog):
    images, labels = data
    model = make_model("cnn", dropout=0.5)
    expected = pgd(model, images, labels, 4 / 255, steps=3, random_start=False)
    model.train()
    model.net.fc.eval()  # a submodule deliberately in eval mode must stay so
    with caplog.at_level(logging.WARNING, logger=adv.__name__):
        got = pgd(model, images, labels, 4 / 255, steps=3, random_start=False)
    assert "train mode" in caplog.text
    assert torch.equal(got, expected)  # attacked in eval mode: batch-norm and dropout frozen
    assert model.training and model.net.bn.training and not model.net.fc.training
