"""What `auto` resolves to (src/pipeline/settings.py), on machines with and without AMX,
GPUs or MPS, whatever this machine has: the hardware is faked, the rules are real."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_params

from pipeline import settings
from pipeline.errors import PipelineError
from pipeline.settings import (
    inference_settings,
    pick_device,
    resolve_processes,
    resolve_sync_batchnorm,
    training_settings,
)

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize(("amx", "precision"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_cpu_is_bf16_only_with_amx(
    monkeypatch: pytest.MonkeyPatch, amx: bool, precision: str
) -> None:
    monkeypatch.setattr(settings, "cpu_has_amx", lambda: amx)
    trained = training_settings(tiny_train_params(precision="auto"), CPU)
    inferred = inference_settings(CPU)
    assert trained.precision == inferred.precision == precision
    assert trained.autocast_dtype == {"bf16": torch.bfloat16, "fp32": None}[precision]
    assert inference_settings(MPS).precision == "fp32"  # unmeasured there: fp32


@pytest.mark.parametrize(("bf16", "precision"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_is_bf16_where_the_gpu_has_it(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, precision: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    assert inference_settings(CUDA).precision == precision


def test_named_settings_are_kept_and_auto_ones_resolved_per_device() -> None:
    forced = training_settings(tiny_train_params(precision="bf16", channels_last=False), CPU)
    assert (forced.precision, forced.channels_last) == ("bf16", False)
    auto = training_settings(tiny_train_params(channels_last="auto"), CPU)
    assert (auto.channels_last, auto.compile, auto.cuda_graphs, auto.fused_optimizer) == (
        True,
        False,
        False,
        True,
    )
    assert inference_settings(MPS).channels_last is False
    # evaluation batch: small on a CPU (faster there), large on a GPU, or as given
    assert [inference_settings(d).eval_batch_size for d in (CPU, CUDA, MPS)] == [64, 1024, 1024]
    assert inference_settings(CPU, batch_size=7).eval_batch_size == 7
    assert training_settings(tiny_train_params(eval_batch_size=256), CPU).eval_batch_size == 256


def test_cuda_graphs_need_cuda_and_compile() -> None:
    with pytest.raises(PipelineError, match="cuda_graphs = true needs a CUDA device and"):
        training_settings(tiny_train_params(compile=True, cuda_graphs=True), CPU)
    graphs = training_settings(tiny_train_params(compile=True, cuda_graphs=True), CUDA)
    assert graphs.compile and graphs.cuda_graphs


def test_sync_batchnorm_is_for_several_processes_on_gpus() -> None:
    assert resolve_sync_batchnorm("auto", 2, CUDA) is True
    assert resolve_sync_batchnorm("auto", 2, CPU) is False
    assert resolve_sync_batchnorm(True, 1, CUDA) is False  # one process: nothing to sync
    with pytest.raises(PipelineError, match="train.sync_batchnorm = true needs CUDA devices"):
        resolve_sync_batchnorm(True, 2, CPU)


def test_processes_auto_is_as_many_gpus_as_share_the_batch() -> None:
    assert resolve_processes("auto", 0, 512) == 1
    assert resolve_processes("auto", 4, 512) == 4
    assert resolve_processes("auto", 6, 512) == 4  # as many as share the batch
    assert resolve_processes("auto", 3, 512) == 2
    assert resolve_processes(3, 4, 48) == 3
    with pytest.raises(PipelineError, match="train.processes = 3 does not divide"):
        resolve_processes(3, 4, 512)


def test_a_device_this_machine_lacks_is_an_error_naming_what_torch_sees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "available_devices", lambda: {"cuda": False, "mps": False})
    assert pick_device("auto") == CPU
    for name in ("cuda", "mps"):
        with pytest.raises(PipelineError, match=f"device '{name}' was asked for but torch"):
            pick_device(name)
        assert f"sees no {name.upper()} device" in settings.missing_device(name)
    assert settings.missing_device("cpu") is None and settings.missing_device("auto") is None
    monkeypatch.setattr(settings, "available_devices", lambda: {"cuda": True, "mps": False})
    assert pick_device("auto") == CUDA and settings.missing_device("cuda") is None
