"""What ONNX Runtime 1.19.2 can train, and the early rejection of everything else.

Two guards, both run before any file is written:
1. `check_layers(model)` walks the torch module tree and names every layer known to have no gradient or
   no CPU kernel in ORT 1.19.2 training (measured, see shared/notes/ort-training.md), with a replacement.
2. `check_graph(model_proto)` scans the exported ONNX forward graph for the op types behind those
   layers, which catches functional calls (`F.elu(x)`) the module walk cannot see.

BatchNorm decision: ORT's training graph neither writes running statistics back nor loads its eval
model, so BatchNorm is exported with FROZEN statistics (`freeze_batchnorm`): it normalises with the
running mean/variance it had at export time, in training and evaluation alike (as torchvision's
FrozenBatchNorm2d), while its affine weight and bias stay trainable. This keeps train and eval
consistent and keeps every parameter that changes inside the flat vector that travels.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model uses a layer or op ORT 1.19.2 cannot train; the message names it and a replacement."""


@dataclass(frozen=True)
class _Unsupported:
    op: str
    suggestion: str


# torch layer class name -> (ONNX op it becomes, what to use instead)
UNSUPPORTED_LAYERS: dict[str, _Unsupported] = {
    "GroupNorm": _Unsupported("GroupNormalization/InstanceNormalization", "use nn.LayerNorm (or BatchNorm, exported frozen)"),
    "InstanceNorm1d": _Unsupported("InstanceNormalization", "use nn.LayerNorm"),
    "InstanceNorm2d": _Unsupported("InstanceNormalization", "use nn.LayerNorm"),
    "InstanceNorm3d": _Unsupported("InstanceNormalization", "use nn.LayerNorm"),
    "PReLU": _Unsupported("PRelu", "use nn.ReLU or nn.LeakyReLU"),
    "ELU": _Unsupported("Elu", "use nn.ReLU or nn.SiLU"),
    "CELU": _Unsupported("Celu", "use nn.ReLU or nn.SiLU"),
    "SELU": _Unsupported("Selu", "use nn.ReLU or nn.SiLU"),
    "Softplus": _Unsupported("Softplus", "use nn.SiLU or nn.ReLU"),
    "Mish": _Unsupported("Mish/Softplus", "use nn.SiLU or nn.GELU"),
    "Hardswish": _Unsupported("HardSwish", "use nn.SiLU"),
    "Hardsigmoid": _Unsupported("HardSigmoid", "use nn.Sigmoid"),
    "ConvTranspose1d": _Unsupported("ConvTranspose", "use nn.Upsample-free designs: Conv + reshape, or Linear"),
    "ConvTranspose2d": _Unsupported("ConvTranspose", "use Conv2d on a nearest-repeated input (torch.repeat_interleave)"),
    "ConvTranspose3d": _Unsupported("ConvTranspose", "use Conv3d"),
    "Upsample": _Unsupported("Resize", "use torch.repeat_interleave for nearest upsampling"),
    "UpsamplingNearest2d": _Unsupported("Resize", "use torch.repeat_interleave"),
    "UpsamplingBilinear2d": _Unsupported("Resize", "use torch.repeat_interleave"),
    "PixelShuffle": _Unsupported("DepthToSpace", "use reshape/permute or a Linear layer"),
    "PixelUnshuffle": _Unsupported("SpaceToDepth", "use reshape/permute"),
    "AdaptiveMaxPool1d": _Unsupported("MaxPool/GlobalMaxPool", "use nn.MaxPool1d with a fixed kernel"),
    "AdaptiveMaxPool2d": _Unsupported("MaxPool/GlobalMaxPool", "use nn.MaxPool2d with a fixed kernel or AdaptiveAvgPool2d(1)"),
    "AvgPool1d": _Unsupported("AveragePool", "use nn.MaxPool1d or a strided Conv1d"),
    "AvgPool2d": _Unsupported("AveragePool", "use nn.MaxPool2d, a strided Conv2d, or AdaptiveAvgPool2d(1) (GlobalAveragePool)"),
    "AvgPool3d": _Unsupported("AveragePool", "use nn.MaxPool3d"),
    "RNN": _Unsupported("RNN", "use nn.GRU or nn.LSTM"),
    "Bilinear": _Unsupported("Einsum", "use nn.Linear on concatenated inputs"),
}

# ONNX op type -> why / what to use instead (second guard, on the exported graph)
UNSUPPORTED_OPS: dict[str, str] = {
    "GroupNormalization": "use LayerNorm",
    "InstanceNormalization": "use LayerNorm",
    "PRelu": "use ReLU or LeakyReLU",
    "Elu": "use ReLU or SiLU",
    "Celu": "use ReLU or SiLU",
    "Selu": "use ReLU or SiLU",
    "Softplus": "use SiLU or ReLU",
    "Mish": "use SiLU or GELU",
    "HardSwish": "use SiLU",
    "HardSigmoid": "use Sigmoid",
    "ReduceMax": "avoid amax/max reductions in the trained path (use mean or logits directly)",
    "ReduceLogSumExp": "use log_softmax/cross-entropy losses instead of logsumexp",
    "CumSum": "avoid cumsum in the trained path",
    "Einsum": "use matmul/Linear",
    "RNN": "use GRU or LSTM",
    "ConvTranspose": "use Conv on a repeated input",
    "Resize": "use torch.repeat_interleave",
    "Upsample": "use torch.repeat_interleave",
    "DepthToSpace": "use reshape/permute",
    "SpaceToDepth": "use reshape/permute",
    "AveragePool": "use MaxPool, a strided Conv, or AdaptiveAvgPool2d(1)",
    "MaxRoiPool": "not trainable in ORT 1.19.2",
}


def check_layers(model: nn.Module) -> None:
    """Raise UnsupportedModelError naming every unsupported layer (module path, op, replacement)."""
    problems = []
    for path, module in model.named_modules():
        info = UNSUPPORTED_LAYERS.get(type(module).__name__)
        if info is not None:
            problems.append(f"  layer `{path or '<root>'}` ({type(module).__name__} -> ONNX {info.op}): "
                            f"no gradient/CPU kernel in ONNX Runtime 1.19.2 training; {info.suggestion}")
    if problems:
        raise UnsupportedModelError("model cannot be trained on device:\n" + "\n".join(problems))


def check_graph(model_proto) -> None:
    """Raise UnsupportedModelError naming every ONNX node whose op type ORT 1.19.2 cannot train."""
    problems = [f"  node `{node.name or node.output[0]}` (op {node.op_type}): {UNSUPPORTED_OPS[node.op_type]}"
                for node in model_proto.graph.node if node.op_type in UNSUPPORTED_OPS]
    if problems:
        raise UnsupportedModelError("exported graph contains ops ONNX Runtime 1.19.2 cannot train:\n"
                                    + "\n".join(problems))


class FrozenStatsBatchNorm(nn.Module):
    """BatchNorm that always normalises with its stored running statistics; weight and bias may train.

    Parameter and buffer names (`weight`, `bias`, `running_mean`, `running_var`) match nn.BatchNormNd, so
    names in the bundle equal the user's `state_dict` names. Exports to Sub/Mul/Add, which ORT trains.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise UnsupportedModelError("BatchNorm with track_running_stats=False cannot be exported; "
                                        "use LayerNorm")
        self.eps = float(bn.eps)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=bn.weight.requires_grad) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=bn.bias.requires_grad) if bn.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over the channel axis 1
        y = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def freeze_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of `model` with every BatchNorm replaced by FrozenStatsBatchNorm, and their paths."""
    model = copy.deepcopy(model)
    replaced: list[str] = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, FrozenStatsBatchNorm(child))
                replaced.append(f"{path}.{child_name}" if path else child_name)
    return model, replaced
