"""Reference models (MLP, small CNN, tiny causal char-Transformer) reused by tests, the simulator and the CLI.

Every factory is importable as `exporter.zoo:NAME` from `fedatt export`. `ZOO` maps a short name to the
factory, the example input (shape, dtype) and the loss, so callers need no knowledge of each model.
All three use only layers ORT 1.19.2 trains with gradients equal to torch's (see exporter/ops.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def mlp(in_features: int = 10, hidden: int = 32, num_classes: int = 2) -> nn.Module:
    """Two hidden layers with ReLU; logits [B, num_classes]."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def cnn(num_classes: int = 10) -> nn.Module:
    """Small CNN for 1x28x28 images (Fashion-MNIST); logits [B, num_classes].

    BatchNorm is exported with frozen statistics (see exporter/ops.py: freeze_batchnorm).
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7x7
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


class CharTransformer(nn.Module):
    """Causal Transformer over characters at a fixed sequence length: tokens [B, T] -> logits [B, T, V].

    The sequence length is baked into the exported graph (positional embedding and causal mask), so
    callers pad or cut text to `seq_len`. Dropout defaults to 0: ORT's training graph is then
    deterministic, which lets the exporter compare its gradients with torch's exactly, and DP noise
    already regularises federated training.
    """

    def __init__(self, vocab_size: int = 80, seq_len: int = 32, d_model: int = 64, nhead: int = 4,
                 num_layers: int = 2, dim_feedforward: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        # Additive causal mask as a non-trainable buffer: exported as a frozen constant of the graph.
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.register_buffer("positions", torch.arange(seq_len).unsqueeze(0), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens) + self.position(self.positions)
        h = self.encoder(h, mask=self.causal_mask)
        return self.head(self.norm(h))


def char_transformer(vocab_size: int = 80, seq_len: int = 32, d_model: int = 64, nhead: int = 4,
                     num_layers: int = 2, dim_feedforward: int = 256, dropout: float = 0.0) -> nn.Module:
    """Tiny next-character Transformer (~113k parameters with the defaults)."""
    return CharTransformer(vocab_size, seq_len, d_model, nhead, num_layers, dim_feedforward, dropout)


@dataclass(frozen=True)
class ZooEntry:
    """A factory with what it takes to export it: example input shape (batch first), dtype, loss."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: str
    loss: str


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(mlp, (1, 10), "float32", "cross_entropy"),
    "cnn": ZooEntry(cnn, (1, 1, 28, 28), "float32", "cross_entropy"),
    "char_transformer": ZooEntry(char_transformer, (1, 32), "int64", "cross_entropy"),
}
