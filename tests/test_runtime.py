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


def fake_gpu(monkeypatch, capability, hip=None, supported=None):
    """A GPU as PyTorch's capability queries would describe it (no GPU needed). ``supported``: what
    torch.cuda.is_bf16_supported answers; by default torch's own rule (native from 8.0, else emulated)."""
    from slidemil import runtime

    def is_bf16_supported(including_emulation=True):
        if supported is not None:
            return supported
        return capability[0] >= 8 or including_emulation

    monkeypatch.setattr(runtime.torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(runtime.torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(runtime.torch.version, "hip", hip)
    return is_bf16_supported


@pytest.mark.parametrize("capability", [(6, 0), (6, 1), (7, 0), (7, 5)])  # P100, GTX 10xx, V100, T4
def test_auto_training_on_pre_ampere_gpus_is_fp16_with_a_scaler(monkeypatch, capability):
    is_bf16_supported = fake_gpu(monkeypatch, capability)
    assert is_bf16_supported()  # PyTorch's default answer counts emulated bf16 ...
    assert not is_bf16_supported(including_emulation=False)  # ... which these GPUs only have
    assert resolve_precision(CUDA, "auto", "training") == Precision("fp16", torch.float16, scaler=True)
    assert resolve_precision(CUDA, "auto", "inference") == Precision("fp16", torch.float16, scaler=False)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0)])  # A100, RTX 30xx, L4, H100
def test_auto_training_on_ampere_and_later_is_bf16(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    assert resolve_precision(CUDA, "auto", "training") == Precision("bf16", torch.bfloat16, scaler=False)


@pytest.mark.parametrize("capability, hip, supported", [
    ((8, 0), None, False),   # PyTorch says no bf16 whatever the capability: auto believes it
    ((9, 0), "6.0", False),  # ROCm: PyTorch's answer decides (capabilities are not CUDA's)
])
def test_auto_never_picks_bf16_where_pytorch_says_unsupported(monkeypatch, capability, hip, supported):
    fake_gpu(monkeypatch, capability, hip, supported)
    assert resolve_precision(CUDA, "auto", "training") == Precision("fp16", torch.float16, scaler=True)


def test_rocm_with_bf16_trains_in_bf16(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), hip="6.0", supported=True)
    assert resolve_precision(CUDA, "auto", "training").name == "bf16"
