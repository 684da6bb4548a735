"""Owns checkpoint offloading: the input gradient checkpointing keeps for each decoder layer but the last goes to
pinned CPU memory on a side stream during the forward, and comes back one layer ahead of that layer's recompute.

Why not the stack's own: TRL's `activation_offloading` (trl/models/activation_offloading.py, from torchtune) hooks
the whole training step, so with our reentrant checkpointing it also offloads every tensor the recompute saves
inside the backward, and it copies a tensor back only when autograd asks for it (the compute stream waits on that
copy); torch.autograd.graph.save_on_cpu copies synchronously and has no prefetch; transformers'
gradient_checkpointing_kwargs only reach torch.utils.checkpoint, which has no offload. Here the hooks are entered
around each checkpointed decoder layer only (transformers 5 checkpoints `forward`, so module hooks run outside the
checkpoint), which sees exactly the layer's saved input: one [tokens, hidden] tensor per layer.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("train")

MIN_BYTES = 1 << 20  # smaller saved tensors (position ids, masks) stay where they are: not worth a copy
ALIGN = 256  # byte alignment of each tensor inside a slab: any dtype view, and aligned DMA
HOST_FRACTION = 0.8  # pinned slabs stop at this share of the RAM free at install (split between the host's
# processes, local_processes()): the rest stays on the GPU
SLAB_TENSORS = 8  # each pinned slab holds >= 8 tensors: torch's host allocator rounds every block to a power of 2


class _Saved:
    """One offloaded tensor: its pinned copy, and the device copy while it travels back."""

    __slots__ = ("cpu", "gpu", "event", "index")

    def __init__(self, cpu: torch.Tensor, index: int):
        self.cpu, self.gpu, self.event, self.index = cpu, None, None, index


class CheckpointOffload:
    """saved_tensors_hooks for the checkpointed layers of one model. `device` is where activations live (a CUDA
    device in training; "cpu" in tests, where the copies run without streams)."""

    def __init__(self, device, min_bytes: int = MIN_BYTES, host_limit: int | None = None, layers: int = 0,
                 reserve_tokens: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors say cuda:0, never bare "cuda"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.host_limit = free_ram() * HOST_FRACTION / local_processes() if host_limit is None else host_limit
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.min_bytes = min_bytes
        self.saved: list[_Saved] = []  # this forward's offloaded tensors, in forward order
        self.slabs: list[list] = []  # [pinned uint8 tensor, bytes used]; kept across steps
        self.offloaded = self.prefetched = self.kept = 0  # counts, for tests and the bench
        # the largest micro-batch's tokens (train.batch_size x data.max_length): the first offloaded tensor sizes pinned
        # slabs for `layers` inputs of that many tokens at once, so a later, longer micro-batch pins nothing mid-run
        self.layers, self.reserve_tokens = layers, reserve_tokens

    def new_step(self) -> None:
        """A new forward begins: its tensors reuse the pinned slabs from the start."""
        self.saved = []
        for slab in self.slabs:
            slab[1] = 0

    def reserve(self, t: torch.Tensor) -> None:
        """Pin, before the first copy, slabs for `layers` layer inputs shaped like `t` at reserve_tokens tokens (when
        they fit the host budget; else slabs come as needed). Pinning takes ~1 s per few GB and stalls the step that
        does it: session 8 measured offload 6-14 % slower than resident over 8 timed steps whose micro-batches kept
        growing, and equal in a later step (805 against 817 ms), so the pinning belongs before the first step."""
        sizes = slab_sizes(t.nbytes // (t.numel() // t.shape[-1]) * self.reserve_tokens, self.layers)
        if sum(sizes) > self.host_limit:
            return
        self.slabs = [[torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda), 0] for size in sizes]
        log.info("checkpoint offload: %.1f GB of pinned RAM for %d layer inputs of up to %s tokens",
                 sum(s[0].numel() for s in self.slabs) / 1e9, self.layers, f"{self.reserve_tokens:,}")

    def host_buffer(self, nbytes: int) -> torch.Tensor | None:
        """`nbytes` of pinned memory carved from a slab (a new slab when none has room; None past host_limit)."""
        step = _aligned(nbytes)
        for slab in self.slabs:
            if slab[0].numel() - slab[1] >= step:
                slab[1] += step
                return slab[0][slab[1] - step:slab[1] - step + nbytes]
        size = 1 << (SLAB_TENSORS * step - 1).bit_length()  # a power of two: nothing lost to rounding
        if sum(slab[0].numel() for slab in self.slabs) + size > self.host_limit:
            return None
        self.slabs.append([torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda), step])
        return self.slabs[-1][0][:nbytes]

    def pack(self, t: torch.Tensor):
        if (t.device != self.device or t.nbytes < self.min_bytes or not t.is_contiguous()
                or isinstance(t, torch.nn.Parameter)):
            return t
        if not self.slabs and self.reserve_tokens and self.layers:
            self.reserve(t)
        buf = self.host_buffer(t.nbytes)
        if buf is None:  # host RAM budget spent: this layer's input stays on the GPU
            self.kept += 1
            return t
        cpu = buf.view(t.dtype).view(t.shape)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                cpu.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is reused only after the copy has read it
        else:
            cpu.copy_(t)
        self.saved.append(_Saved(cpu, len(self.saved)))
        self.offloaded += 1
        return self.saved[-1]

    def fetch(self, h: _Saved) -> None:
        """Start copying `h` back (on the side stream: the compute stream goes on)."""
        if h.gpu is not None:
            return
        if not self.cuda:
            h.gpu = h.cpu.clone()
            return
        with torch.cuda.stream(self.stream):
            h.gpu = torch.empty(h.cpu.shape, dtype=h.cpu.dtype, device=self.device)
            h.gpu.copy_(h.cpu, non_blocking=True)
            h.event = self.stream.record_event()

    def unpack(self, h):
        if isinstance(h, torch.Tensor):
            return h
        prefetched = h.gpu is not None
        self.fetch(h)
        if h.index > 0:  # the backward goes from the last layer to the first: the one before is next
            self.fetch(self.saved[h.index - 1])
        t, h.gpu = h.gpu, None
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(h.event)
            t.record_stream(current)  # allocated on the side stream, used on this one
        self.prefetched += prefetched
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _aligned(nbytes: int) -> int:
    """`nbytes` rounded up to ALIGN: the room one tensor takes in a slab."""
    return -(-nbytes // ALIGN) * ALIGN


def slab_sizes(input_bytes: int, layers: int) -> list[int]:
    """The pinned slabs that hold `layers` layer inputs of `input_bytes` each: powers of two (torch's pinned allocator
    rounds every block up to one), largest first, each filled with whole inputs. train plan prints their sum."""
    step = _aligned(input_bytes)
    sizes, left = [], layers
    while left > 0:
        sizes.append(1 << max((step * left).bit_length() - 1, (step - 1).bit_length()))
        left -= sizes[-1] // step
    return sizes


def local_processes() -> int:
    """Training processes on this host (torchrun's / accelerate's LOCAL_WORLD_SIZE; 1 alone): each pins its own slabs,
    and pinned memory cannot be swapped out, so each takes its share of the RAM budget."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def free_ram() -> int:
    """Bytes of RAM free now (MemAvailable), or 0 where the OS does not say."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


def checkpointed_layers(model) -> list:
    """The model's decoder layers that transformers checkpoints (GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def install(model, device, min_bytes: int = MIN_BYTES, host_limit: int | None = None,
            reserve_tokens: int | None = None) -> CheckpointOffload | None:
    """Hooks around every checkpointed decoder layer: while one runs its training forward with checkpointing on,
    what autograd saves (the layer's input) is offloaded, into pinned RAM reserved for micro-batches of up to
    `reserve_tokens` tokens (None: pinned as needed). Returns the offloader, None when the model has no such layers."""
    layers = checkpointed_layers(model)
    if not layers:
        return None
    # the last layer's input stays on the GPU: its backward comes first, before any copy back could be under way. Its
    # forward's end starts copying back the input offloaded last, the one the backward needs next
    last = layers[-1] if len(layers) > 1 else None
    off = CheckpointOffload(device, min_bytes, host_limit, layers=len(layers) - (last is not None),
                            reserve_tokens=reserve_tokens)
    active: list = []  # the hooks context entered by the layer now running (at most one)

    def training(layer) -> bool:
        return layer.training and torch.is_grad_enabled() and getattr(layer, "gradient_checkpointing", False)

    def enter(layer, args, kwargs=None):
        if layer is not last and training(layer):
            if layer is layers[0]:
                off.new_step()
            active.append(off.hooks())
            active[-1].__enter__()

    def leave(layer, args, output):
        if active:
            active.pop().__exit__(None, None, None)
        if layer is last and off.saved and training(layer):
            off.fetch(off.saved[-1])

    for layer in layers:
        layer.register_forward_pre_hook(enter)
        layer.register_forward_hook(leave, always_call=True)
    return off
