"""All six torchvision classifiers: one CAMAL step at 224 x 224, and batch Grad-CAM against per-sample."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script

dl = load_script("train_dl_camal")
MODELS = ["resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_v2_t", "maxvit_t"]


def first_weight(model):
    return next(p for p in model.net.parameters() if p.dim() > 1)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(2, 224, 224, dtype=torch.bool)
    masks[0, 40:120, 60:150] = True
    masks[1, 100:200, 20:90] = True
    return images, masks, torch.tensor([0, 2])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_camal_step_and_proposition_1(name, batch):
    torch.manual_seed(0)
    images, masks, labels = batch
    model = dl.CamModel(name, 3)

    # one CAMAL training step
    model.train()
    logits, cam = dl.class_cam(model, images, labels, double_backward=True, autocast=dl.nullcontext())
    assert logits.shape == (2, 3) and cam.shape == (2, 224, 224)
    assert cam.min() >= 0 and cam.max() <= 1
    assert (cam.amax(dim=(1, 2)) > 0.5).all(), f"{name}: a CAM is all zero (the layer gets no gradient)"
    loss = F.cross_entropy(logits, labels) + dl.camal_loss(cam, masks)
    reg_grad = torch.autograd.grad(dl.camal_loss(cam, masks), first_weight(model), retain_graph=True)[0]
    assert reg_grad.abs().sum() > 0, f"{name}: the CAMAL gradient does not reach the first layer"
    loss.backward()
    assert torch.isfinite(first_weight(model).grad).all()

    # batch Grad-CAM equals one backward per sample (eval mode: BatchNorm and dropout per sample). In float64,
    # so that float32's batch-size-dependent kernel paths (up to 8e-5 through MaxViT) cannot hide a real coupling.
    model.eval().double()
    _, cam_batch = dl.class_cam(model, images, labels, double_backward=False, autocast=dl.nullcontext())
    for b in range(2):
        _, cam_one = dl.class_cam(
            model, images[b : b + 1], labels[b : b + 1], double_backward=False, autocast=dl.nullcontext()
        )
        torch.testing.assert_close(cam_batch[b], cam_one[0], atol=1e-10, rtol=0)


@pytest.mark.slow
def test_vit_layer_choice_and_math_attention():
    """Why the ViT CAM sits before the last block, and why CAMAL forces the math attention backend."""
    torch.manual_seed(0)
    model = dl.CamModel("vit_b_16", 3).train()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    out = {}
    model.net.encoder.layers[-1].register_forward_hook(lambda m, i, o: out.setdefault("last", o))
    logits, acts = model(dl.normalise(images))
    grad_last = torch.autograd.grad(logits[:, 0].sum(), out["last"], retain_graph=True)[0]
    assert grad_last[:, 1:].abs().max() == 0, "the final block's patch tokens should get no gradient"
    assert grad_last[:, 0].abs().max() > 0
    # without the math backend, CPU's fused attention has no double backward
    cam = dl.grad_cam(acts, logits[:, 0], (224, 224), create_graph=True, to_nchw=model.to_nchw)
    with pytest.raises(RuntimeError, match="not implemented"):
        cam.sum().backward()


@pytest.mark.slow
def test_vit_math_attention_in_the_last_block_only():
    """Only the block after the CAM layer is differentiated twice: running just that one on the math kernel gives the
    same CAMAL gradients as the math kernel everywhere (and keeps the fused kernel, faster on a GPU, in the other
    11)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = dl.CamModel("vit_b_16", 3).train()
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    labels, masks = torch.tensor([0, 2]), torch.zeros(2, 224, 224, dtype=torch.bool)
    masks[:, 50:150, 60:170] = True

    def camal_grads():
        model.zero_grad()
        logits, cam = dl.class_cam(model, images, labels, double_backward=True, autocast=dl.nullcontext())
        (F.cross_entropy(logits, labels) + dl.camal_loss(cam, masks)).backward()
        return [p.grad.clone() for p in model.parameters()]

    last_block_only = camal_grads()
    with sdpa_kernel(SDPBackend.MATH):
        everywhere = camal_grads()
    for a, b in zip(last_block_only, everywhere):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model._double_backward is False  # the context resets its flag
    # a deep copy computes with its own last block (the math-kernel wrapper is bound to the copy, not the original)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.net.encoder.layers[-1].parameters():
            p.mul_(0.5)
        x = dl.normalise(images[:1])
        before, _ = model(x)
        changed, acts = twin(x)
        after, _ = model(x)
    assert acts is not None and not torch.allclose(changed, before) and torch.equal(after, before)


@pytest.mark.slow
def test_train_step_is_each_methods_loss():
    """The training loop's step (the one gradcam_overhead.py times) against the loss written out: CE plus lambda times
    mean(beta - alpha) (camal; prior is the same term on CLIP's masks), mean(beta) over valid samples (suppress), or
    CE alone (vanilla, which still reports CAMAL's term). SGD with lr 1 makes each weight's change its gradient."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=gen)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 8:30, 10:40], masks[1, 30:60, 4:20] = True, True  # sample 2 has no mask: it adds nothing to the term
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(0)
    model = dl.CamModel("resnet18", 3)
    assert dl.METHODS["prior"]["term"] == dl.METHODS["camal"]["term"] == "camal" and dl.METHODS["prior"]["clip_masks"]

    logits, cam = dl.class_cam(model, images, labels, double_backward=True, autocast=dl.nullcontext())
    alpha = torch.stack([cam[i][masks[i]].mean() for i in range(2)])
    beta = torch.stack([cam[i][~masks[i]].mean() for i in range(2)])
    ce = F.cross_entropy(logits, labels)
    for method, term in (("camal", (beta - alpha).mean()), ("suppress", beta.mean()), ("vanilla", 0.0)):
        want = torch.autograd.grad(ce + 0.5 * term, list(model.parameters()), allow_unused=True, retain_graph=True)
        trained = copy.deepcopy(model)  # the same weights, and its own hook that records A
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)
        loss, ce_s, reg, _, _ = dl.train_step(
            trained, optimizer, (images, masks, labels), dl.METHODS[method]["term"], 0.5, dl.nullcontext()
        )
        torch.testing.assert_close(reg.detach(), (beta if method == "suppress" else beta - alpha).mean().detach())
        torch.testing.assert_close(loss.detach(), (ce_s + (0.5 * reg if method != "vanilla" else 0.0)).detach())
        for (name, p), q, g in zip(model.named_parameters(), trained.parameters(), want):
            torch.testing.assert_close(
                p.detach() - q.detach(),
                torch.zeros_like(p) if g is None else g,
                atol=1e-6,
                rtol=1e-4,
                msg=f"{method} {name}",
            )
