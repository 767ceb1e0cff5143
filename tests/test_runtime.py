"""The one precision policy (slidemil.runtime.resolve_precision): every stage, every device, no GPU needed."""

import pytest
import torch

from slidemil.runtime import Precision, resolve_precision
from slidemil.tasks import make_task

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def ampere(device):
    return True


def volta(device):
    return False


@pytest.mark.parametrize("need", ["inference", "training"])
def test_auto_is_exact_float32_off_cuda(need):
    # CPU outputs stay what they were before the policy: no autocast at all.
    for device in (CPU, torch.device("mps")):
        p = resolve_precision(device, "auto", need, has_bf16=ampere)
        assert p == Precision("fp32", None, scaler=False)


def test_auto_on_cuda_depends_on_the_stage_and_the_gpu():
    # Inference: fp16 on every GPU (what feature files extracted on CUDA have always held).
    assert resolve_precision(CUDA, "auto", "inference", has_bf16=ampere) == Precision("fp16", torch.float16, False)
    assert resolve_precision(CUDA, "auto", "inference", has_bf16=volta) == Precision("fp16", torch.float16, False)
    # Training: bf16 where the GPU has it, else fp16 with a loss scaler.
    assert resolve_precision(CUDA, "auto", "training", has_bf16=ampere) == Precision("bf16", torch.bfloat16, False)
    assert resolve_precision(CUDA, "auto", "training", has_bf16=volta) == Precision("fp16", torch.float16, True)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("need", ["inference", "training"])
def test_an_explicit_setting_is_taken_as_given(device, need):
    def unused(device):
        raise AssertionError("the capability check is for auto only")

    assert resolve_precision(device, "fp32", need, has_bf16=unused) == Precision("fp32", None, False)
    assert resolve_precision(device, "bf16", need, has_bf16=unused) == Precision("bf16", torch.bfloat16, False)
    # fp16 needs a scaler only when gradients flow.
    assert resolve_precision(device, "fp16", need, has_bf16=unused) == Precision("fp16", torch.float16,
                                                                                  need == "training")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision(CPU, "fp8")
    with pytest.raises(ValueError, match="need must be one of inference, training"):
        resolve_precision(CPU, "auto", "serving")


def test_autocast_and_scaler_on_cpu():
    layer = torch.nn.Linear(4, 4)
    for setting, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        p = resolve_precision(CPU, setting, "training")
        with p.autocast(CPU):
            assert layer(torch.ones(1, 4)).dtype == dtype
        scaler = p.grad_scaler(CPU)
        assert not scaler.is_enabled()
        loss = torch.tensor(2.0)
        assert scaler.scale(loss) is loss  # a disabled scaler changes nothing: CPU results stay exact


def test_every_stage_follows_the_policy(monkeypatch):
    """Features, MIL training, tile-supervised and SimCLR all ask runtime.resolve_precision."""
    from slidemil import runtime
    from slidemil.features import extract
    from slidemil.mil import train
    from slidemil.pretrain import simclr, tile_supervised

    for module in (extract, train, simclr, tile_supervised):
        assert module.resolve_precision is runtime.resolve_precision, module.__name__
    asked = []
    monkeypatch.setattr(train, "resolve_precision", lambda *a, **k: asked.append(k.get("need")) or Precision("fp32", None))
    train.Data({}, {}, make_task(), CPU)
    assert asked == ["training"]
