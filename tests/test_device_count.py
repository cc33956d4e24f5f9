"""The device-op counter (tests/_device_count.py) sees every kind of would-be sync, and only those."""
from __future__ import annotations

import numpy as np
import torch

from _device_count import DeviceCounter

DEV = torch.device("cuda")  # under the counter: the CPU, with CUDA's code paths


def counted(fn) -> DeviceCounter:
    counter = DeviceCounter()
    with counter:
        fn()
    return counter


def kinds(fn) -> dict[str, int]:
    return dict(counted(fn).syncs_by_kind())


def test_each_sync_kind_is_seen_with_its_site():
    x = torch.arange(6.0)  # seeded below: on the device
    cases = {
        "item": lambda: x.sum().item(),
        "nonzero": lambda: x[x > 2],
        "masked_select": lambda: torch.masked_select(x, x > 2),
        "unique": lambda: torch.unique(x.long()),
        "repeat_interleave": lambda: torch.repeat_interleave(x.long()),
        "bincount": lambda: torch.bincount(x.long()),
        "d2h": lambda: x.cpu(),
        "h2d": lambda: torch.tensor([1.0, 2.0], device=DEV),
    }
    for kind, fn in cases.items():
        counter = DeviceCounter()
        counter.seed(x)
        with counter:
            fn()
        assert dict(counter.syncs_by_kind()) == {kind: 1}, kind
        assert list(counter.sites) == [f"{__file__}:{fn.__code__.co_firstlineno}"], kind


def test_bool_branch_mask_assignment_and_blocking_upload_are_syncs():
    host = torch.ones(4)

    def step():
        y = host.to(DEV)  # blocking upload
        y[y > 0] = 2.0  # boolean-mask index_put
        if y.sum() > 0:  # bool() of a device tensor
            y = y * 2
        torch.where(y > 1)  # one-argument where is nonzero
        return y.tolist()

    assert kinds(step) == {"h2d": 1, "nonzero": 2, "item": 1, "d2h": 1}


def test_sync_free_code_counts_ops_but_no_syncs():
    host = torch.ones(4, 3)

    def step():
        y = host.to(DEV, non_blocking=True)
        mask = y[:, 0] > 0
        z = y.masked_fill(~mask[:, None], 0.0)
        idx = torch.zeros(4, dtype=torch.long, device=DEV)
        out = torch.zeros(2, 3, device=DEV).index_add_(0, idx, z)
        return torch.where(mask[:, None], out[idx], z).repeat_interleave(2, dim=0)

    counter = counted(step)
    assert counter.total_syncs() == 0
    assert counter.ops["other"] >= 8


def test_host_tensors_and_downloads_are_not_device_ops():
    def step():
        a = torch.arange(10)  # on the host: no device op
        b = (a * 2).sum().item()  # host scalar: no sync
        d = torch.ones(3, device=DEV)
        h = d.cpu()  # one download
        return b, (h + 1).numpy(), np.asarray(h)  # host ops afterwards

    counter = counted(step)
    assert dict(counter.syncs_by_kind()) == {"d2h": 1}
    assert counter.ops["other"] == 1  # the device factory


def test_stages_and_seeded_modules():
    layer = torch.nn.Linear(3, 2)
    counter = DeviceCounter()
    counter.seed(layer)
    with counter:
        with counter.stage("features"):
            out = layer(torch.ones(1, 3, device=DEV))
        with counter.stage("points"):
            int(out.argmax())
    assert counter.ops["features"] >= 2 and counter.total_syncs("features") == 0
    assert dict(counter.syncs["points"]) == {"item": 1}


def test_device_named_by_a_tensor_and_cuda_paths_run_on_the_cpu():
    frames = torch.ones(2, 3)

    def step():
        x = frames.to("cuda", non_blocking=True)  # a pinned upload: no sync
        if x.device.type == "cpu":  # the counter keeps tensors on the CPU
            pass
        y = torch.zeros(2, 3, device=x.device) + x  # a device factory named through a tensor
        z = torch.tensor([0.5, 1.5], device=x.device)  # from host data: blocking
        w = y[[0, 1]] * z[:, None]  # a Python list index: an implicit upload
        return w.new_tensor([1.0]), torch.arange(3) + 1  # new_tensor uploads; arange stays on the host

    counter = counted(step)
    assert dict(counter.syncs_by_kind()) == {"h2d": 3}
