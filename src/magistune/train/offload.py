"""Activation offloading: the checkpointed activations wait for backward in CPU memory instead of on the GPU.

With gradient checkpointing every decoder layer keeps only its input for backward and recomputes the rest
there. Those inputs still add up: Magistral Small, 40 layers × 2 rows × 8,192 tokens × 5,120 × 2 bytes (bf16)
= 6.7 GB. Offloading copies each one to pinned CPU memory as the forward pass saves it and back when backward
needs it: GPU memory no longer grows with the number of layers, at the cost of 2 × 6.7 GB of PCIe/C2C traffic
per micro-batch (~0.3 s at ~50 GB/s, partly hidden: both copies are non-blocking).

The mechanism is torch's saved-tensor hooks. Non-reentrant checkpointing saves a layer's inputs through
autograd's saved tensors (torch.utils.checkpoint, `save_inputs`), outside its own hooks, so a hooks context
around the decoder's forward sees exactly the layer inputs (plus the few tensors saved outside the layers:
the final norm's input, the rotary tables). Tensors saved inside a checkpointed layer never reach us: the
checkpoint drops them and recomputes them in backward.

Parameters are never copied (a frozen 4-bit weight saved by a matmul is already resident), nor are tensors
below `min_bytes` (copies of a few KB cost more in latency than they save).
"""

from __future__ import annotations

import torch
import torch.nn as nn

MIN_BYTES = 1 << 20  # 1 MiB: one row of 8,192 tokens × 64 bf16 values; every layer input is far larger


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """`with OffloadActivations(): hidden = decoder(...)` keeps the tensors autograd saves on the CPU.

    `device_types`: the devices whose tensors are moved ("cuda"; tests add "cpu" to exercise the round trip,
    where the copy is to fresh CPU memory). `n_offloaded` / `bytes_offloaded` count what was moved.
    """

    def __init__(self, min_bytes: int = MIN_BYTES, device_types: tuple[str, ...] = ("cuda",)):
        self.min_bytes = min_bytes
        self.device_types = device_types
        self.n_offloaded = 0
        self.bytes_offloaded = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        size = t.numel() * t.element_size()
        if t.device.type not in self.device_types or size < self.min_bytes or isinstance(t, nn.Parameter):
            return t
        pinned = t.device.type == "cuda"
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
        # Device → host without waiting: the copy is ordered on the current stream, so neither the GPU memory of t
        # (reused only by later work on that stream) nor `host` (read only by the copy back) is touched early.
        host.copy_(t, non_blocking=pinned)
        self.n_offloaded += 1
        self.bytes_offloaded += size
        return t.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())  # back for backward (stream-ordered)
