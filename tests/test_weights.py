"""Tests for apo_ray.models.weights: packing round trips, zero-copy views, Ray transfer and ownership."""

from __future__ import annotations

import pickle
import sys
import time

import numpy as np
import pytest
import torch

from apo_ray.models.weights import (
    ALIGNMENT,
    PackedWeights,
    TensorSpec,
    get_weights,
    load_packed_into,
    pack_state_dict,
    pack_stream,
    put_weights,
    unpack_state_dict,
)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w_fp32": torch.randn(5, 3, generator=g),
        "w_bf16": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 bytes: next offset needs padding
        "steps": torch.arange(3, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name, value in a.items():
        x, y = value.cpu(), b[name].cpu()
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # compare bytes, so bf16 and NaN payloads are checked exactly
        assert torch.equal(
            x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)
        )


class _Stream:
    """A state dict handed over one tensor at a time, as a sharded learner gathers it."""

    def __init__(self, sd):
        self.sd, self.handed = sd, 0
        self.specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]

    def tensors(self):
        for value in self.sd.values():
            self.handed += 1
            yield value.clone()  # a fresh tensor each time, dropped once packed


def test_a_streamed_state_dict_packs_like_a_whole_one():
    sd = mixed_state_dict()
    stream = _Stream(sd)
    packed = pack_stream(stream)
    whole = pack_state_dict(sd)
    assert stream.handed == len(sd)
    assert packed.meta == whole.meta and packed.total_bytes == whole.total_bytes
    assert_bit_exact(sd, unpack_state_dict(packed))
    out = torch.empty(whole.total_bytes + 100, dtype=torch.uint8)  # into a reused, larger buffer
    assert_bit_exact(sd, unpack_state_dict(pack_stream(_Stream(sd), out=out)))


def test_a_stream_that_breaks_its_specs_is_refused():
    sd = mixed_state_dict()
    stream = _Stream(sd)
    stream.specs[0] = TensorSpec("w_fp32", torch.float32, (3, 5))
    with pytest.raises(ValueError, match=r"w_fp32: got torch.float32 \(5, 3\), the layout says float32 \(3, 5\)"):
        pack_stream(stream)
    stream = _Stream(sd)
    stream.specs.pop()
    with pytest.raises(ValueError):  # one tensor more than the specs announce
        pack_stream(stream)


def test_round_trip_is_bit_exact_for_every_dtype_and_layout():
    sd = mixed_state_dict()
    packed = pack_state_dict(sd)
    assert_bit_exact(sd, unpack_state_dict(packed))
    assert_bit_exact(sd, unpack_state_dict(packed, copy=True))
    assert unpack_state_dict(packed)["scalar"].shape == ()
    assert unpack_state_dict(packed)["transposed"].is_contiguous()


def test_offsets_are_aligned_and_metadata_describes_the_buffer():
    packed = pack_state_dict(mixed_state_dict())
    assert packed.buffer.dtype == np.uint8 and packed.buffer.ndim == 1
    assert packed.total_bytes == packed.buffer.nbytes
    assert packed.buffer.ctypes.data % ALIGNMENT == 0
    assert all(m.offset % ALIGNMENT == 0 for m in packed.meta)
    ends = [m.offset + m.nbytes for m in packed.meta]
    assert all(end <= nxt.offset for end, nxt in zip(ends, packed.meta[1:]))  # no overlap
    bf16 = next(m for m in packed.meta if m.name == "w_bf16")
    assert (bf16.dtype, bf16.shape, bf16.nbytes) == ("bfloat16", (7,), 14)
    assert packed.tensor_bytes == sum(t.numel() * t.element_size() for t in mixed_state_dict().values())


def test_cpu_unpack_is_zero_copy_and_copy_true_is_not():
    packed = pack_state_dict(mixed_state_dict())
    start = packed.buffer.ctypes.data
    for name, t in unpack_state_dict(packed).items():
        if t.numel():
            assert start <= t.data_ptr() < start + packed.total_bytes, name
    copied = unpack_state_dict(packed, copy=True)["w_fp32"]
    assert not start <= copied.data_ptr() < start + packed.total_bytes


def test_read_only_buffer_unpacks_without_warning():
    packed = pack_state_dict(mixed_state_dict())
    packed.buffer.flags.writeable = False  # what ray.get returns
    with _no_warnings():
        views = unpack_state_dict(packed)
    assert_bit_exact(mixed_state_dict(), views)
    copied = unpack_state_dict(packed, copy=True)
    copied["w_fp32"].add_(1)  # writable after copy=True


def test_pack_into_given_buffer():
    sd = mixed_state_dict()
    out = torch.empty(10_000, dtype=torch.uint8)
    packed = pack_state_dict(sd, out=out)
    assert packed.buffer.ctypes.data == out.data_ptr()
    assert_bit_exact(sd, unpack_state_dict(packed))
    with pytest.raises(ValueError, match="at least"):
        pack_state_dict(sd, out=torch.empty(8, dtype=torch.uint8))


def test_plain_pickle_round_trip():
    sd = mixed_state_dict()
    packed = pickle.loads(pickle.dumps(pack_state_dict(sd), protocol=5))
    assert isinstance(packed, PackedWeights)
    assert_bit_exact(sd, unpack_state_dict(packed))


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.head = torch.nn.Linear(3, 2, bias=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))


def test_load_packed_into_copies_in_place_and_checks_names():
    src, dst = TinyNet(), TinyNet()
    src.calls.fill_(7)
    weight_before = dst.proj.weight
    load_packed_into(dst, pack_state_dict(src.state_dict()))
    assert dst.proj.weight is weight_before  # same Parameter object, new values
    assert_bit_exact(src.state_dict(), dst.state_dict())
    with pytest.raises(KeyError, match="missing"):
        load_packed_into(dst, pack_state_dict({"proj.weight": src.proj.weight}))
    bad = dict(src.state_dict(), **{"head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="head.weight"):
        load_packed_into(dst, pack_state_dict(bad))


def test_load_packed_into_casts_bf16_into_fp32_module():
    src, dst = TinyNet(), TinyNet()
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    load_packed_into(dst, pack_state_dict(bf16))
    assert dst.proj.weight.dtype == torch.float32
    assert torch.equal(dst.proj.weight, bf16["proj.weight"].float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_unpack_and_load_are_bit_exact():
    sd = mixed_state_dict()
    packed = pack_state_dict(sd)
    on_gpu = unpack_state_dict(packed, device="cuda")
    assert all(t.is_cuda for t in on_gpu.values())
    assert_bit_exact(sd, on_gpu)
    # GPU source: packed on the GPU, one D2H transfer; a buffer bigger than one staging chunk
    big = {"a": torch.randn(40 << 20, device="cuda"), "b": torch.randn(3, device="cuda").to(torch.bfloat16)}
    assert_bit_exact(big, unpack_state_dict(pack_state_dict(big), device="cuda"))
    net = TinyNet().cuda()
    src = TinyNet()
    load_packed_into(net, pack_state_dict(src.state_dict()))
    assert_bit_exact(src.state_dict(), net.state_dict())


# --------------------------------------------------------------------------------------------- Ray
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    # Workers cannot import this test module: ship its classes (actors, TinyNet) by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 << 20)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Loader:
    """A pool member: keeps its model, loads new weights into it."""

    def __init__(self) -> None:
        self.net = TinyNet()

    def load(self, refs: list) -> dict:
        packed = ray.get(refs[0])
        info = {"writeable": bool(packed.buffer.flags.writeable), "addr": packed.buffer.ctypes.data}
        load_packed_into(self.net, packed)
        return {"state": {k: v.clone() for k, v in self.net.state_dict().items()}, **info}

    def views_share_object_store_memory(self, refs: list) -> bool:
        packed = ray.get(refs[0])
        start = packed.buffer.ctypes.data
        views = get_weights(refs[0])
        return all(start <= t.data_ptr() < start + packed.total_bytes for t in views.values())


@ray.remote(num_cpus=0)
class ShortLivedLearner:
    """Stands in for a learner process publishing weights (it owns what it puts)."""

    def publish(self) -> list:
        # 256 KB: lives in the shared object store, not inlined in a reply
        ref = put_weights({"w": torch.arange(1 << 16, dtype=torch.float32)})
        return [ref]  # wrapped in a list so Ray passes the reference, not the value


def test_actor_loads_weights_from_object_store(ray_local):
    src = TinyNet()
    ref = put_weights(src.state_dict())
    loader = Loader.remote()
    out = ray.get(loader.load.remote([ref]))
    assert_bit_exact(src.state_dict(), out["state"])
    assert out["writeable"] is False  # backed by shared object-store memory, not a private copy
    assert out["addr"] % ALIGNMENT == 0
    assert ray.get(loader.views_share_object_store_memory.remote([ref]))
    assert_bit_exact(src.state_dict(), get_weights(ref))
    other = TinyNet()
    ref2 = put_weights(other.state_dict())  # reuses put_weights' pack buffer: ref must not change
    assert_bit_exact(src.state_dict(), get_weights(ref))
    assert_bit_exact(other.state_dict(), get_weights(ref2))
    ref3 = put_weights(_Stream(other.state_dict()))  # a learner's gathered stream, same buffer reused
    assert_bit_exact(other.state_dict(), ray.get(loader.load.remote([ref3]))["state"])
    assert_bit_exact(src.state_dict(), get_weights(ref))
    ray.kill(loader)


def test_weights_whose_owner_died_are_reloaded_from_their_checkpoint(ray_local, tmp_path):
    """The object store copy dies with the process that put it; a version that was checkpointed is
    then read from its file (workers.fetch_weights), one that was not raises."""
    from apo_ray.game.store import write_checkpoint
    from apo_ray.game.system import Weights
    from apo_ray.runtime.workers import fetch_weights

    expected = torch.arange(1 << 16, dtype=torch.float32)
    checkpoint = tmp_path / "w.safetensors"  # the phase store's format (apo_ray.game.store.write_checkpoint)
    write_checkpoint(checkpoint, {"w": expected})
    learner = ShortLivedLearner.remote()
    [ref] = ray.get(learner.publish.remote())
    [orphan] = ray.get(learner.publish.remote())
    # (not fetched here before the kill: a fetched copy could outlive its owner in this process)
    ray.kill(learner)
    # The object store frees a dead owner's objects asynchronously: poll until the loss shows.
    deadline, lost = time.monotonic() + 30, None
    while lost is None and time.monotonic() < deadline:
        try:
            ray.get(orphan, timeout=10)  # result dropped at once: a held value would pin the object
            time.sleep(0.5)
        except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError) as e:
            lost = e
    assert lost is not None, "an object whose owner was killed stayed readable for 30 s"
    state = fetch_weights(Weights("rm/x", ref, str(checkpoint)))
    assert isinstance(state, dict) and torch.equal(state["w"], expected)
    with pytest.raises(ray.exceptions.ObjectLostError):
        fetch_weights(Weights("rm/y", orphan))


class _no_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
