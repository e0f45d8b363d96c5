import pytest
import torch

from scribelm.devices import DeviceError, available_devices, check_device, resolve_device


def test_available_devices_match_what_torch_can_use():
    have = available_devices()
    assert have[0] == "cpu"
    assert ("cuda" in have) == torch.cuda.is_available()
    for name in have:
        torch.empty(1, device=name)  # each one works


@pytest.mark.parametrize("name, message", [
    ("tpu", "unknown device 'tpu'"),
    ("meta", "device 'meta' cannot run a model"),
    ("cuda:99", "device 'cuda:99'"),
])
def test_devices_this_machine_lacks_are_refused_with_the_ones_it_has(name, message):
    with pytest.raises(DeviceError, match=message) as err:
        check_device(name)
    assert f"this PyTorch build ({torch.__version__}) has: {', '.join(available_devices())}" in str(err.value)


def test_auto_and_the_trainer():
    from scribelm.train.trainer import resolve_device as trainer_device

    assert check_device("cpu") == "cpu" and check_device("auto", allow_auto=True) == "auto"
    with pytest.raises(DeviceError):
        check_device("auto")
    assert resolve_device("auto") == ([d for d in available_devices() if d != "cpu"] or ["cpu"])[0]
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        trainer_device("tpu")  # `scribe pretrain --train.device tpu`: one line, not a torch parser error
