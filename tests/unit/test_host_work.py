"""The pieces that keep the host out of a step (issue 35, item 2), each alone: where draws come from, the fused
optimizer on CUDA, the stop flag's collective, batches moved ahead, losses read in one transfer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from finetune.draws import host_choices, step_draws
from finetune.training import interrupt
from finetune.training.inputs import ahead_on_device
from finetune.training.loop import UnreadLosses
from finetune.training.optim import build_optimizer


def test_a_cpu_run_draws_tensors_and_choices_from_one_generator_as_it_always_did():
    draws = step_draws(1234, "cpu")
    assert draws.tensors is draws.host  # the draws' order, and so the golden losses, as before
    old = torch.Generator().manual_seed(1234)
    expected = (torch.randn(3, generator=old), torch.randint(5, (4,), generator=old).tolist())
    drawn = (torch.randn(3, generator=draws.tensors), host_choices(4, list(range(5)), draws.host))
    assert torch.equal(drawn[0], expected[0]) and drawn[1] == expected[1]


def test_host_choices_refuse_a_generator_on_a_device():
    on_gpu = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(ValueError, match="CPU generator, not one on cuda: pass StepDraws.host"):
        host_choices(2, ["a", "b"], on_gpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_tensors_are_drawn_there_and_choices_on_the_host():
    draws = step_draws(7, "cuda")
    assert draws.tensors.device.type == "cuda" and draws.host.device.type == "cpu"


@pytest.mark.parametrize("device_type, fused, foreach", [("cuda", True, None), ("cpu", None, True),
                                                         ("mps", None, True)])
def test_adamw_is_the_fused_one_on_cuda_and_foreach_elsewhere(device_type, fused, foreach):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    optimizer = build_optimizer(groups, "adamw", (0.9, 0.999), 0.01, 1e-8, device_type=device_type)
    assert optimizer.defaults["fused"] is fused and optimizer.defaults["foreach"] is foreach


def test_foreach_adamw_updates_as_the_per_tensor_loop_bit_for_bit_on_the_cpu():
    """What lets the CPU's runs (and the golden losses) stay as they were with one operator per update."""
    start = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate([(8, 4), (4,)])]
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, foreach=foreach)
        generator = torch.Generator().manual_seed(7)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def _accelerator(processes: int):
    return SimpleNamespace(num_processes=processes, device=torch.device("cpu"),
                           reduce=lambda tensor, reduction: tensor)


def test_a_stop_request_is_acted_on_at_once_by_one_process_and_at_read_points_by_several():
    request = interrupt.StopRequest()
    assert not request.seen_here(_accelerator(1))
    request.signum = 2
    assert request.seen_here(_accelerator(1))
    assert not request.seen_here(_accelerator(2))  # asking the others is a collective: only where losses are read


def test_several_processes_agree_on_a_stop_one_read_point_late():
    """The summed flags come back at the next read point, so asking never waits for the step just queued."""
    request, several = interrupt.StopRequest(), _accelerator(2)
    assert not request.requested_anywhere(several)
    request.signum = 2
    assert not request.requested_anywhere(several)  # the flag is on its way
    assert request.requested_anywhere(several)
    assert request.requested_anywhere(_accelerator(1))  # one process: at once


def test_unread_losses_come_back_in_step_order_once():
    unread = UnreadLosses()
    for step, loss in [(1, 0.5), (2, float("nan")), (3, 0.25)]:
        unread.add(step, torch.tensor(loss), step / 10, _accelerator(1))
    read = unread.read()
    assert [(step, lr) for step, _, lr in read] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert read[0][1] == 0.5 and read[1][1] != read[1][1] and read[2][1] == 0.25  # the NaN kept, in its place
    assert unread.read() == []


def test_a_log_point_reads_one_step_late_and_a_save_reads_all():
    """log.every: 1 reads step n - 1's loss at step n, whose work the device has done while step n was queued."""
    unread = UnreadLosses()
    unread.add(1, torch.tensor(0.5), 0.1, _accelerator(1))
    assert unread.read(latest_too=False) == []
    unread.add(2, torch.tensor(0.25), 0.1, _accelerator(1))
    assert unread.read(latest_too=False) == [(1, 0.5, 0.1)]
    assert unread.read(latest_too=True) == [(2, 0.25, 0.1)]


def test_batches_come_one_ahead_with_their_cached_latents_on_the_device():
    fetched = []

    def loader():
        for index in range(3):
            fetched.append(index)
            yield {"captions": [str(index)], "latent_keys": [f"k{index}"],
                   "conditions": {"target_sizes": torch.tensor([[index, index]])}}

    store = SimpleNamespace(get=lambda keys: (torch.full((1, 4, 2, 2), float(keys[0][1])), torch.ones(1, 4, 2, 2)))
    encoder = SimpleNamespace(device=torch.device("cpu"), latent_store=store,
                              cached_moments=lambda keys: store.get(keys), masks=lambda batch: None)
    batches = ahead_on_device(loader(), encoder)
    first = next(batches)
    assert fetched == [0, 1]  # the next batch is fetched (and its copies queued) before this one is used
    assert first["captions"] == ["0"] and torch.equal(first["latent_moments"][0], torch.zeros(1, 4, 2, 2))
    assert [batch["captions"] for batch in batches] == [["1"], ["2"]]
