"""Loss heads appended to the exported graph (ORT onnxblock blocks), one graph input named `labels`.

cross_entropy: logits [B, C] with labels [B] int64, or logits [B, ..., C] (class axis LAST, e.g. a
Transformer's [B, T, V]) with labels [B, ...]. ONNX's SoftmaxCrossEntropyLoss wants the class axis at 1,
so for rank >= 3 the head transposes the logits first; the model and its inference output keep the
natural class-last layout. mse / bce: target `labels` has the logits' shape and dtype (float).
All losses use mean reduction, like torch's defaults.
"""
from __future__ import annotations

import copy

import onnx

LOSSES = ("cross_entropy", "mse", "bce")
LABELS = "labels"


def make_loss_block(loss: str, logits_rank: int):
    """An onnxblock.Block computing `loss` from the graph's logits output and a `labels` input."""
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class _LabelledLoss(onnxblock.Block):
        def __init__(self) -> None:
            super().__init__()
            self._inner: onnxblock.Block | None = None
            if loss == "mse":
                self._inner = onnxblock.loss.MSELoss()
            elif loss == "bce":
                self._inner = onnxblock.loss.BCEWithLogitsLoss()
            elif loss == "cross_entropy":
                self._inner = onnxblock.loss.CrossEntropyLoss()
            else:
                raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")

        def build(self, logits_name: str) -> str:
            if loss != "cross_entropy" or logits_rank <= 2:
                return self._inner(logits_name, LABELS)
            # labels [B, ...]: the logits' graph output type without its last (class) axis
            labels = copy.deepcopy(_graph_utils.get_output_from_output_name(self.base, logits_name))
            labels.name = LABELS
            labels.type.tensor_type.elem_type = onnx.TensorProto.INT64
            del labels.type.tensor_type.shape.dim[-1]
            self.base.graph.input.append(labels)
            class_first = _graph_utils.generate_graph_name("logits_class_first")
            perm = [0, logits_rank - 1, *range(1, logits_rank - 1)]
            loss_name = _graph_utils.generate_graph_name("loss")
            # Written out rather than via onnxblock's CrossEntropyLoss, which only looks for `labels`
            # among node arguments and would add a second, class-first-shaped labels input.
            self.base.graph.node.extend([
                onnx.helper.make_node("Transpose", [logits_name], [class_first],
                                      name=_graph_utils.generate_graph_name("Transpose"), perm=perm),
                onnx.helper.make_node("SoftmaxCrossEntropyLoss", [class_first, LABELS],
                                      [loss_name, _graph_utils.generate_graph_name("log_prob")],
                                      name=_graph_utils.generate_graph_name("SoftmaxCrossEntropyLoss"),
                                      reduction="mean"),
            ])
            return loss_name

    return _LabelledLoss()
