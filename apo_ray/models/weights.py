"""Weight exchange between learners and pools through the Ray object store.

Why this module exists: ``ray.put(state_dict)`` pickles every tensor separately (torch's reducer copies
each storage into a bytes object, unless ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` is set), and the
receiver then unpickles and copies every tensor again before moving it, tensor by tensor, to its
device: slower than local disk (benchmarks/README.md has the numbers).

Here a state dict travels as ONE contiguous ``uint8`` numpy buffer plus a small metadata list:

* ``pack_state_dict``: one copy of every tensor into the buffer, each at a 64-byte aligned offset (any
  dtype can be viewed in place, and the same holds once Ray puts the buffer in the object store,
  which aligns large out-of-band buffers to 64 bytes). CUDA tensors are first packed on the GPU
  (device-local copies) and leave it in one device-to-host transfer through pinned staging chunks.
* Ray pickles a numpy array out of band (pickle protocol 5), so ``ray.put`` is one memcpy into
  shared memory and ``ray.get`` on the same node maps that memory without a copy: the array is
  read-only and backed by the object store.
* ``pack_stream``: the same buffer filled from a :class:`TensorStream`, a state dict whose tensors
  arrive one at a time (a sharded learner gathers each from its shards): laid out from the
  tensors' specs first, each copied into its slot as it arrives, so no full state dict is built
  besides the buffer.
* ``unpack_state_dict(..., device="cpu")`` returns tensors that are views over that buffer (no copy);
  ``device="cuda"`` moves the whole buffer in one host-to-device transfer (double-buffered pinned
  staging chunks, ``non_blocking``) and slices the tensors out of the GPU buffer.

Ownership: an object is owned by the process that called ``ray.put`` and is lost when that process
dies, even if other references to it exist. ``put_weights`` therefore publishes from a process that
lives as long as the weights are needed (learner rank 0 lives for the whole run); whoever reads a
version whose owner is gone reloads it from its checkpoint (see ``workers.fetch_weights``).

This is a plain module (pure functions and a dataclass): Ray only appears in ``put_weights`` and
``get_weights``; everything else works, and is tested, without a Ray instance.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

ALIGNMENT = 64  # bytes; >= the largest element size, and a cache line
STAGING_CHUNK_BYTES = 64 << 20  # pinned staging chunk for host <-> device copies (two are kept per GPU)


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in the packed buffer."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer, a multiple of ALIGNMENT
    nbytes: int


@dataclass
class PackedWeights:
    """A state dict as one contiguous byte buffer plus metadata.

    Pickles cheaply: the metadata is a few KB, and Ray serialises ``buffer`` out of band, so after
    ``ray.get`` on the same node ``buffer`` is a read-only view of object-store shared memory.
    """

    buffer: np.ndarray  # 1-D uint8
    meta: tuple[TensorMeta, ...]
    total_bytes: int  # len(buffer), including alignment padding

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, without padding."""
        return sum(m.nbytes for m in self.meta)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.meta]


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"unknown torch dtype {name!r} in packed weights metadata")
    return dtype


def _typed_view(flat: torch.Tensor, m: TensorMeta) -> torch.Tensor:
    """The tensor described by ``m`` as a view over the uint8 tensor ``flat``."""
    return flat[m.offset : m.offset + m.nbytes].view(_dtype_from_name(m.dtype)).view(m.shape)


# ---------------------------------------------------------------------------------------------
# Host <-> device copies through small, reused pinned buffers. Pinning the whole (GB-sized) buffer
# would cost more than the copy itself; two 64 MB pinned chunks let the CPU memcpy of chunk i
# overlap the DMA of chunk i-1, and are allocated once per process and device.
_staging: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _staging_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _staging:
        _staging[device] = tuple(
            torch.empty(STAGING_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)
        )
    return _staging[device]


def _host_to_device(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a 1-D uint8 host tensor to ``device`` (CUDA); returns when the copy is complete."""
    n = src.numel()
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    if n == 0:
        return dst
    if src.is_pinned():
        dst.copy_(src, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        return dst
    stream = torch.cuda.current_stream(device)
    bufs = _staging_buffers(device)
    done: list[torch.cuda.Event | None] = [None, None]
    for i, start in enumerate(range(0, n, STAGING_CHUNK_BYTES)):
        k = i % 2
        if done[k] is not None:
            done[k].synchronize()  # the DMA that last read this staging buffer has finished
        end = min(start + STAGING_CHUNK_BYTES, n)
        bufs[k][: end - start].copy_(src[start:end])
        dst[start:end].copy_(bufs[k][: end - start], non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        done[k] = event
    stream.synchronize()  # staging buffers are reused by the next call; dst is ready for any stream
    return dst


def _device_to_host(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the 1-D uint8 CUDA tensor ``src`` into the pageable host tensor ``dst``."""
    n = src.numel()
    stream = torch.cuda.current_stream(src.device)
    bufs = _staging_buffers(src.device)
    pending: list[tuple[torch.cuda.Event, int, int] | None] = [None, None]

    def drain(k: int) -> None:
        if pending[k] is not None:
            event, start, end = pending[k]
            event.synchronize()
            dst[start:end].copy_(bufs[k][: end - start])
            pending[k] = None

    chunks = list(range(0, n, STAGING_CHUNK_BYTES))
    for i, start in enumerate(chunks):
        k = i % 2
        drain(k)  # chunk i-2 leaves staging buffer k while chunk i-1 is still in flight
        end = min(start + STAGING_CHUNK_BYTES, n)
        bufs[k][: end - start].copy_(src[start:end], non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        pending[k] = (event, start, end)
    for i in range(len(chunks), len(chunks) + 2):  # the last two chunks, in order
        drain(i % 2)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a state dict will be, known before its values are (e.g. before it is
    gathered from its shards): name, dtype and full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@runtime_checkable
class TensorStream(Protocol):
    """A state dict read one tensor at a time: ``specs`` up front, then ``tensors()`` yields each
    full tensor in ``specs`` order (valid until the next one is asked for)."""

    specs: Sequence[TensorSpec]

    def tensors(self) -> Iterator[torch.Tensor]: ...


def packed_layout(specs: Sequence[TensorSpec]) -> tuple[tuple[TensorMeta, ...], int]:
    """Each tensor's place in the packed buffer (64-byte aligned, in order) and the buffer's size."""
    meta, offset = [], 0
    for spec in specs:
        nbytes = spec.nbytes
        meta.append(TensorMeta(spec.name, str(spec.dtype).removeprefix("torch."), tuple(spec.shape), offset, nbytes))
        offset = _align(offset + nbytes)
    return tuple(meta), offset


def _host_buffer(total: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        # torch's CPU allocator aligns to 64 bytes (numpy only guarantees 16); numpy shares the memory.
        return torch.empty(total, dtype=torch.uint8)
    if out.dtype != torch.uint8 or out.device.type != "cpu" or out.dim() != 1 or out.numel() < total:
        raise ValueError(f"out must be a 1-D uint8 CPU tensor of at least {total} bytes")
    return out[:total]


def pack_stream(stream: TensorStream, out: torch.Tensor | None = None) -> PackedWeights:
    """Pack a state dict that arrives one tensor at a time (each gathered from its shards, say):
    the buffer is laid out from ``stream.specs``, then each tensor is copied into its slot as it
    arrives (from any device), so the full state dict never exists anywhere but in the buffer.
    ``out``: as for :func:`pack_state_dict`."""
    meta, total = packed_layout(stream.specs)
    host = _host_buffer(total, out)
    with torch.no_grad():
        for m, t in zip(meta, stream.tensors(), strict=True):
            if tuple(t.shape) != m.shape or str(t.dtype).removeprefix("torch.") != m.dtype:
                raise ValueError(f"{m.name}: got {t.dtype} {tuple(t.shape)}, the layout says {m.dtype} {m.shape}")
            _typed_view(host, m).copy_(t.detach())
    if host.is_pinned() and torch.cuda.is_available():
        torch.cuda.synchronize()  # copies from the GPU into pinned memory may still be in flight
    return PackedWeights(buffer=host.numpy(), meta=meta, total_bytes=total)


def state_dict_specs(state_dict: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """The :class:`TensorSpec` of each tensor of ``state_dict``, in order."""
    specs = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape)))
    return specs


def pack_state_dict(state_dict: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> PackedWeights:
    """Copy every tensor of ``state_dict`` into one contiguous, 64-byte aligned uint8 buffer.

    Any dtype works (bf16 included: bytes are copied, numpy never sees the dtype), as do 0-dim and
    non-contiguous tensors (copied straight into a typed view of their slot, no intermediate copy).
    Tensors on one CUDA device are packed on the GPU and brought to the host in one transfer.
    ``out``: a 1-D uint8 CPU tensor to pack into (at least as big as needed) instead of a fresh
    allocation. Filling GBs of fresh memory costs page faults that can exceed the copy itself; a
    sender that publishes repeatedly can reuse one buffer (``put_weights`` does).
    """
    meta, total = packed_layout(state_dict_specs(state_dict))
    host = _host_buffer(total, out)
    tensors = list(state_dict.values())
    devices = {t.device for t in tensors}
    with torch.no_grad():
        if len(devices) == 1 and next(iter(devices)).type == "cuda" and total > 0:
            staging = torch.empty(total, dtype=torch.uint8, device=next(iter(devices)))
            for m, t in zip(meta, tensors):
                _typed_view(staging, m).copy_(t.detach())
            if host.is_pinned():
                host.copy_(staging)  # one DMA straight into pinned memory
            else:
                _device_to_host(staging, host)
        else:
            for m, t in zip(meta, tensors):
                _typed_view(host, m).copy_(t.detach())  # D2H per tensor if devices are mixed
    return PackedWeights(buffer=host.numpy(), meta=tuple(meta), total_bytes=total)


def _buffer_as_tensor(buffer: np.ndarray) -> torch.Tensor:
    """A uint8 CPU tensor sharing memory with ``buffer`` (which ray.get returns read-only)."""
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(f"packed buffer must be 1-D uint8, got {buffer.dtype} with shape {buffer.shape}")
    if buffer.flags.writeable:
        return torch.from_numpy(buffer)
    # torch warns that it has no read-only tensors. The views we hand out are documented as
    # read-only: a write would silently change shared object-store memory that every other reader
    # of the object sees. So silence exactly that warning, once, here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(buffer)


def unpack_state_dict(
    packed: PackedWeights, device: str | torch.device = "cpu", copy: bool = False
) -> dict[str, torch.Tensor]:
    """Rebuild the state dict from ``packed``.

    ``device="cpu"``, ``copy=False``: zero-copy views over ``packed.buffer``. After ``ray.get`` that
    buffer is read-only object-store memory: do NOT write to these tensors (use ``copy=True``, or
    ``load_state_dict``/``load_packed_into``, which copy). The views keep the buffer (and so the
    object-store object) alive, and all share one storage, so ``torch.save`` of one view would
    save the whole buffer.
    ``device="cpu"``, ``copy=True``: one copy of the whole buffer, writable views over the copy.
    ``device="cuda[:i]"``: one host-to-device transfer of the whole buffer, then views over the GPU
    buffer (writable; ``copy`` is irrelevant).
    """
    device = torch.device(device)
    flat = _buffer_as_tensor(packed.buffer)
    if device.type == "cpu":
        if copy:
            flat = flat.clone()
    elif device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        flat = _host_to_device(flat, device)
    else:
        flat = flat.to(device)  # other accelerators: one transfer, then views
    return {m.name: _typed_view(flat, m) for m in packed.meta}


def load_packed_into(module: torch.nn.Module, packed: PackedWeights, strict: bool = True) -> None:
    """Copy ``packed`` into ``module``'s existing parameters and buffers, in place.

    The whole buffer goes to the module's device in one transfer; each tensor is then a device-local
    ``copy_`` (dtype casts allowed, e.g. bf16 weights into an fp32 module). Nothing is re-allocated,
    so a generator or scorer actor keeps its model (and anything holding its parameters) across
    weight updates. Tied weights appear under several names and are simply written twice.
    ``strict``: raise if names differ (missing or unexpected); shapes must always match.
    """
    targets = module.state_dict(keep_vars=True)
    by_name = {m.name: m for m in packed.meta}
    if strict:
        missing = sorted(set(targets) - set(by_name))
        unexpected = sorted(set(by_name) - set(targets))
        if missing or unexpected:
            raise KeyError(
                f"packed weights do not match the module: missing {missing}, unexpected {unexpected}"
            )
    devices = {t.device for name, t in targets.items() if name in by_name}
    on_device = {d: unpack_state_dict(packed, d) for d in devices}  # normally exactly one device
    with torch.no_grad():
        for name, target in targets.items():
            if name not in by_name:
                continue
            src = on_device[target.device][name]
            if src.shape != target.shape:
                raise ValueError(
                    f"{name}: packed shape {tuple(src.shape)} != module shape {tuple(target.shape)}"
                )
            target.data.copy_(src)
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


# ---------------------------------------------------------------------------------------------
# The Ray layer: two thin functions.
_scratch: torch.Tensor | None = None  # put_weights' reusable pack buffer (ray.put copies out of it)
_scratch_lock = threading.Lock()


def _scratch_buffer(total: int, pin: bool) -> torch.Tensor:
    """The process's reusable pack buffer, grown (or pinned) when needed; call under _scratch_lock."""
    global _scratch
    if _scratch is None or _scratch.numel() < total or (pin and not _scratch.is_pinned()):
        _scratch = None  # free the old one before allocating the new one
        _scratch = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    return _scratch


def put_weights(weights: Mapping[str, torch.Tensor] | TensorStream) -> Any:
    """Pack ``weights`` (a state dict, or a :class:`TensorStream` whose tensors are gathered one at
    a time) and put it in the object store; returns the ``ray.ObjectRef``.

    The object is owned by this process: it lives as long as this process does and someone holds
    a reference (``OwnerDiedError`` on ``ray.get`` after the owner died). Packs into a buffer kept
    for the next call (the process keeps one state dict's worth of host memory), so repeated
    publishes skip the page faults of fresh memory.
    """
    import ray

    streamed = isinstance(weights, TensorStream)
    if streamed:
        total = packed_layout(weights.specs)[1]
    else:
        total = sum(_align(t.numel() * t.element_size()) for t in weights.values())
    with _scratch_lock:  # the buffer is reused: ray.put has copied it into the store when it returns
        # From CUDA weights, a pinned scratch takes the device-to-host DMA directly (pinning costs
        # once; the buffer is kept); from CPU weights, plain memory.
        pin = torch.cuda.is_available() and (streamed or any(t.is_cuda for t in weights.values()))
        scratch = _scratch_buffer(total, pin)
        packed = pack_stream(weights, out=scratch) if streamed else pack_state_dict(weights, out=scratch)
        return ray.put(packed)


def get_weights(ref: Any, device: str | torch.device = "cpu", copy: bool = False) -> dict[str, torch.Tensor]:
    """``ray.get`` packed weights and unpack them on ``device`` (see ``unpack_state_dict``)."""
    import ray

    return unpack_state_dict(ray.get(ref), device=device, copy=copy)
