"""The double-pips guard: find a scale node at the graph's tail and check it against the declared units.

A model outputs price changes, pips or points (the checkpoint's ``output_units``). The EA
multiplies by the pair's pips multiplier only when the model outputs price changes. When the
graph itself already multiplies by that multiplier but the checkpoint declares ``price``,
the EA multiplies a second time and every forecast is 100× (JPY pairs) or 10000× too large.

Scaling patterns, decided by :func:`classify_scaling`:

======== ============================== ============== ========= =========================================
pattern  tail scale node                output_units   outcome   meaning
======== ============================== ============== ========= =========================================
A        none                           price          ok        the EA multiplies once
B        factor == pips multiplier      pips / points  ok        the model is scaled; the EA must not multiply
C        none                           pips / points  warning   scaling learned in weights or targets;
                                                                 the graph cannot prove it
D        factor == pips multiplier      price          error     the EA would multiply again (GateFailed)
E        factor != pips multiplier,     any            warning   e.g. a normalization std or mean; the
         or only an offset                                       message names the factor and offset
======== ============================== ============== ========= =========================================

A *tail scale node* is a Mul or Div by a constant whose elements are all equal (a scalar, or
a broadcast shape such as [1] or [1, 1]), or an Add or Sub of such a constant. It must sit on
the path from a graph output back through value-preserving nodes (Identity, Reshape,
Squeeze, Unsqueeze, Cast, Flatten, Transpose, Gather, Slice). Consecutive scale nodes are
combined into one affine map ``y = factor * x + offset``.

The bias of a final Linear is not a scale node. A Gemm is never one. An Add is the Linear's
bias when its other operand comes directly from a MatMul or Gemm and the constant has as
many elements as the output's last axis, even when all of its values are equal. An Add of a
constant with differing values, and a Mul or Div by such a constant (a per-horizon
de-normalization), are not scale nodes either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from fxbundle.errors import GateFailed
from fxbundle.graph_checks import constant_values

SCALE_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
# Nodes that move, select or re-type values without changing them: a scale before them still
# scales the output.
PASSTHROUGH_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Flatten", "Transpose", "Gather", "Slice"})
LINEAR_OPS = frozenset({"MatMul", "Gemm"})
OUTPUT_UNITS = ("price", "pips", "points")
# Relative tolerance for "factor equals the pips multiplier": 1 / 0.01 in float32 is 100.0000002.
FACTOR_RTOL = 1e-5


@dataclass(frozen=True)
class ScaleNode:
    op_type: str
    name: str
    constant: float
    constant_first: bool  # the constant is the node's first input (e.g. 0.5 - x)


@dataclass(frozen=True)
class TailScale:
    """The affine map ``y = factor * x + offset`` applied by the scale nodes at the graph's tail."""

    output: str
    nodes: tuple[ScaleNode, ...]  # in graph order, the last one nearest the output
    factor: float
    offset: float

    @property
    def op_types(self) -> tuple[str, ...]:
        return tuple(node.op_type for node in self.nodes)

    @property
    def op_type(self) -> str:
        """The op type of the node that sets the factor (Mul or Div), else of the node nearest the output."""
        scaling = [node.op_type for node in self.nodes if node.op_type in ("Mul", "Div")]
        return scaling[-1] if scaling else self.nodes[-1].op_type

    def describe(self) -> str:
        ops = " -> ".join(f"{node.op_type}({node.constant:g})" for node in self.nodes)
        return f"{ops}: y = {self.factor:g} * x + {self.offset:g}"

    def to_dict(self) -> dict:
        return {
            "output": self.output,
            "op_type": self.op_type,
            "op_types": list(self.op_types),
            "node_names": [node.name for node in self.nodes],
            "factor": self.factor,
            "offset": self.offset,
        }


def detect_tail_scale(proto: onnx.ModelProto) -> TailScale | None:
    """Return the scale applied at the tail of the first graph output that has one, else None."""
    graph = proto.graph
    producers = {output: node for node in graph.node for output in node.output if output}
    constants = constant_values(graph)
    for graph_output in graph.output:
        width = _last_dim(graph_output)
        chain = _scale_chain(graph_output.name, producers, constants, width)
        if chain:
            return _compose(graph_output.name, chain)
    return None


def _last_dim(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    if len(dims) == 0 or not dims[-1].HasField("dim_value"):
        return None
    return dims[-1].dim_value


def _resolve_constant(name: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """Return the value of ``name`` when it is a constant, also through Identity or Cast nodes."""
    seen = set()
    while name not in constants:
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast") or name in seen:
            return None
        seen.add(name)
        name = node.input[0]
    return constants[name]


def _uniform_value(value: np.ndarray) -> float | None:
    """Return the single value of a constant whose elements are all equal, else None."""
    if value.size == 0 or not np.issubdtype(value.dtype, np.number):
        return None
    flat = value.astype(np.float64).ravel()
    if not np.all(flat == flat[0]):
        return None
    return float(flat[0])


def _scale_chain(
    output: str, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray], width: int | None
) -> list[ScaleNode]:
    """Walk back from ``output`` and return the scale nodes at its tail, nearest the output last."""
    chain: list[ScaleNode] = []
    name = output
    visited: set[str] = set()
    while name not in visited:
        visited.add(name)
        node = producers.get(name)
        if node is None:
            break
        if node.op_type in PASSTHROUGH_OPS and node.domain in ("", "ai.onnx"):
            name = node.input[0]
            continue
        scale = _as_scale_node(node, producers, constants, width)
        if scale is None:
            break
        chain.insert(0, scale)
        name = node.input[1] if scale.constant_first else node.input[0]
    return chain


def _as_scale_node(
    node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], constants: dict[str, np.ndarray], width: int | None
) -> ScaleNode | None:
    if node.op_type not in SCALE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    first = _resolve_constant(node.input[0], producers, constants)
    second = _resolve_constant(node.input[1], producers, constants)
    if (first is None) == (second is None):
        return None  # two variables, or two constants that a constant-folding pass would remove
    constant_first = first is not None
    if constant_first and node.op_type == "Div":
        return None  # c / x is a reciprocal, not a scale
    value = first if constant_first else second
    uniform = _uniform_value(value)
    if uniform is None:
        return None
    variable = node.input[1] if constant_first else node.input[0]
    if node.op_type == "Add" and _is_linear_bias(variable, value, producers, width):
        return None
    return ScaleNode(op_type=node.op_type, name=node.name or node.output[0], constant=uniform, constant_first=constant_first)


def _is_linear_bias(variable: str, value: np.ndarray, producers: dict[str, onnx.NodeProto], width: int | None) -> bool:
    """Apply the bias rule: an Add directly after MatMul/Gemm whose constant spans the output width."""
    producer = producers.get(variable)
    if producer is None or producer.op_type not in LINEAR_OPS:
        return False
    if width is None:
        return value.size > 1
    return value.size == width


def _compose(output: str, chain: list[ScaleNode]) -> TailScale:
    factor, offset = 1.0, 0.0
    for node in chain:
        if node.op_type == "Mul":
            factor, offset = factor * node.constant, offset * node.constant
        elif node.op_type == "Div":
            factor, offset = factor / node.constant, offset / node.constant
        elif node.op_type == "Add":
            offset += node.constant
        elif node.constant_first:  # Sub: c - (factor * x + offset)
            factor, offset = -factor, node.constant - offset
        else:  # Sub: (factor * x + offset) - c
            offset -= node.constant
    return TailScale(output=output, nodes=tuple(chain), factor=factor, offset=offset)


# --- classification -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingVerdict:
    """The scaling pattern of a model; ``details`` are the parameters of the message ``message_key``."""

    pattern: str  # "A" | "B" | "C" | "D" | "E"
    outcome: str  # "ok" | "warning" | "error"
    message_key: str
    output_units: str
    details: dict[str, Any] = field(default_factory=dict)
    tail_scale: TailScale | None = None

    def message(self, lang: str | None = None) -> str:
        from fxbundle.i18n import translate

        return translate(self.message_key, lang, **self.details)

    def raise_if_error(self) -> None:
        """Raise GateFailed for pattern D, where the EA would apply the multiplier a second time."""
        if self.outcome == "error":
            raise GateFailed(self.message_key, **self.details)

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "outcome": self.outcome,
            "message_key": self.message_key,
            "output_units": self.output_units,
            "details": dict(self.details),
            "tail_scale": self.tail_scale.to_dict() if self.tail_scale is not None else None,
        }


def classify_scaling(tail_scale: TailScale | None, output_units: str, pips_multiplier: float) -> ScalingVerdict:
    """Decide the scaling pattern (table in the module docstring) of a model."""
    if output_units not in OUTPUT_UNITS:
        raise ValueError(f"output_units {output_units!r} is not one of {OUTPUT_UNITS}")
    if not pips_multiplier > 0:
        raise ValueError(f"pips_multiplier must be positive, got {pips_multiplier!r}")

    scaled_units = output_units != "price"
    details: dict[str, Any] = {"units": output_units, "multiplier": format(pips_multiplier, "g")}

    if tail_scale is None:
        if scaled_units:
            return ScalingVerdict("C", "warning", "scaling.pattern_c", output_units, details)
        return ScalingVerdict("A", "ok", "scaling.pattern_a", output_units, details)

    details.update(
        factor=format(tail_scale.factor, "g"),
        offset=format(tail_scale.offset, "g"),
        nodes=", ".join(node.name for node in tail_scale.nodes),
    )
    if math.isclose(tail_scale.factor, pips_multiplier, rel_tol=FACTOR_RTOL):
        if scaled_units:
            return ScalingVerdict("B", "ok", "scaling.pattern_b", output_units, details, tail_scale)
        return ScalingVerdict("D", "error", "scaling.pattern_d", output_units, details, tail_scale)
    if math.isclose(tail_scale.factor, 1.0, rel_tol=FACTOR_RTOL):
        return ScalingVerdict("E", "warning", "scaling.tail_offset", output_units, details, tail_scale)
    return ScalingVerdict("E", "warning", "scaling.unexpected_factor", output_units, details, tail_scale)


def scaling_applied(verdict: ScalingVerdict) -> bool:
    """Return whether the model's output is already in pips or points, so the EA must not multiply.

    The declared ``output_units`` decide, because pattern C (scaling learned in the weights)
    has no node to show it. Raises GateFailed for pattern D, for which no bundle may be written.
    """
    verdict.raise_if_error()
    return verdict.output_units != "price"
