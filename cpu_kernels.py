"""
Opt-in CPU kernels for model.py's networks. One call, `cpu_kernels.apply(svd_or_module)`, switches every plain
nn.Conv2d, nn.Conv3d, nn.Linear and model.FeedForward inside the module, in place, to the subclass of the same name
below, and returns the module. Each subclass's forward takes its faster route on CPU where its condition holds and
runs the plain forward otherwise (any other device, dtype or shape). Parameters, buffers and state_dict keys do not
change; outputs and gradients equal the plain modules' up to float round-off. model.py itself has none of this.

    svd = cpu_kernels.apply(load_svd.load(path))      # or SVD(cfg), or a UNet; before torch.compile

What each kernel does, and what it did on the 2-core AMD EPYC (Zen 4) VM it was measured on, shared with other jobs
(SVD's UNet at the `svd` config, 14 x 16 x 16 latent, fp32, 1 thread; the kernel alone against the plain modules,
alternating forward by forward in one process; CPU time inside the modules it replaces, median and range of the
per-round ratios over 6 rounds):
  Conv2d       unfold + one GEMM when the weights are >= 16x the input: 0.84 (0.77-0.96)
  Conv3d       a (k, 1, 1) conv over frames as a 2D (k, 1) conv: 0.79 (0.75-0.83)
  Linear       fp32, >= 192 rows and >= 2^26 multiply-adds, as a 1x1 conv: 0.77 (0.73-0.80)
  FeedForward  chunks of >= 512 tokens: 0.93 (0.84-1.06), and the live-tensor peak of a UNet forward falls to 0.58x
               (459 -> 267 MB at 14 x 32 x 32; 4.1 -> 2.4 GB at 14 x 72 x 128)
All four: 0.86 (0.83-0.93) of the plain UNet forward's CPU time (8 rounds). The toy models sample in the same time
with or without them (0.95-1.02). The gain varies by machine: Intel and Apple CPUs are unmeasured, and on another
AMD EPYC VM of the same kind the Linear-as-1x1-conv trick ran 95 GF/s against F.linear's 72, where an earlier
isolated measurement on this one gave 233 against 90. CLIP's fused q/k/v projection is an F.linear call inside
model.ResidualAttentionBlock, out of this module's reach: it stays plain.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import model

# -----------------------------------------------------------------------------
# the kernels


class Conv2d(nn.Conv2d):
    """A conv whose weights are >= 16x its input (SVD's 1280-channel 2x2 and 4x4 levels) runs as unfold + one GEMM
    over all frames: oneDNN re-lays out the whole weight into a fresh buffer on every call (59 MB for a 1280 -> 1280
    3x3 conv), which can cost more than the GEMM itself when there are few output pixels."""

    def forward(self, x):
        if x.device.type != "cpu" or self.weight.numel() < 16 * x.numel() or self.groups != 1 \
                or isinstance(self.padding, str) or self.padding_mode != "zeros":
            return super().forward(x)
        N, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)     # (N, Cin*kh*kw, Ho*Wo)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], N * Ho * Wo)                     # (Cin*kh*kw, N*Ho*Wo)
        w = self.weight.reshape(self.out_channels, -1)
        out = torch.mm(w, cols) if self.bias is None else torch.addmm(self.bias[:, None], w, cols)
        return out.view(-1, N, Ho, Wo).transpose(0, 1).contiguous()                         # (N, Cout, Ho, Wo)


class Conv3d(nn.Conv3d):
    """A (k, 1, 1) kernel (a conv over frames only) runs as a 2D (k, 1) conv over (T, H*W)."""

    def forward(self, x):
        if x.device.type != "cpu" or isinstance(self.padding, str) or self.kernel_size[1:] != (1, 1) \
                or self.stride[1:] != (1, 1) or self.padding[1:] != (0, 0) or self.padding_mode != "zeros":
            return super().forward(x)
        B, C, T, H, W = x.shape
        out = F.conv2d(x.reshape(B, C, T, H * W), self.weight[..., 0], self.bias, (self.stride[0], 1),
                       (self.padding[0], 0), (self.dilation[0], 1), self.groups)                 # (B, Cout, T', H*W)
        return out.view(*out.shape[:3], H, W)


class Linear(nn.Linear):
    """In fp32 with >= 192 rows and >= 2^26 multiply-adds (rows x in x out), a 1x1 convolution over a channels-last
    view of the rows (no copy), which reaches oneDNN's AVX-512 conv kernels instead of the MKL sgemm behind F.linear
    (AVX2 code on this AMD CPU). Below that the conv's per-call weight re-layout and overhead make it lose: with fewer
    rows at SVD's widths, and in narrow layers such as the toy's and the tiny preset's (alone: 1.3-6x F.linear's time
    at 64-128 wide, 256-3584 rows). dilation=2 is a no-op for a 1x1 kernel; it stops PyTorch from sending a batch-1 1x1
    conv at 1 thread to its im2col + sgemm fallback."""

    def forward(self, x):
        K = x.shape[-1]
        M = x.numel() // K
        if x.device.type != "cpu" or x.dtype != torch.float32 or M < 192 or M * self.weight.numel() < 2 ** 26 \
                or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return super().forward(x)
        rows = x.reshape(-1, K).contiguous()                                            # (M, K)
        out = F.conv2d(rows.view(1, -1, 1, K).permute(0, 3, 1, 2), self.weight[:, :, None, None], self.bias,
                       dilation=2)                                                      # (1, N, M, 1) channels-last
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


class FeedForward(model.FeedForward):
    """Many tokens run in chunks (each token is independent), so the GEGLU intermediate never exists whole (147 MB at
    SVD's first level for a 14 x 32 x 32 latent). A chunk is 512 tokens at SVD's widths and at least 2^19
    intermediate values in narrow nets (2048 tokens at the tiny preset's first level), since every chunk costs a
    handful of small ops."""

    chunk_values = 2 ** 19

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])                                               # (N, dim)
        n = max(512, self.chunk_values // self.net[0].proj.out_features)
        if x.device.type != "cpu" or rows.shape[0] <= 2 * n:
            return super().forward(x)
        out = rows.new_empty(rows.shape[0], self.net[-1].out_features)
        for i in range(0, rows.shape[0], n):
            out[i:i + n] = self.net(rows[i:i + n])
        return out.view(*x.shape[:-1], -1)

# -----------------------------------------------------------------------------
# the one call


KERNELS = {nn.Conv2d: Conv2d, nn.Conv3d: Conv3d, nn.Linear: Linear, model.FeedForward: FeedForward}


def apply(module, kernels=KERNELS):
    """Switch every submodule of exactly a class in `kernels` (plain -> fast) to its fast class, in place; subclasses
    of those classes (e.g. model.TimeMixConv) are left alone. Returns module."""
    for m in module.modules():
        fast = kernels.get(type(m))
        if fast is not None:
            m.__class__ = fast
    return module
