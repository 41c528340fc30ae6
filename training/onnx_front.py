"""A brought ONNX classifier put behind kdserve's input: one graph that training distils from and Triton serves.

Every kdserve model takes uint8 [N, H, W, 3] images as `kdcontract.imageprep` prepares them and answers
logits [N, classes] (`training.onnx_tools.INPUT_NAME` / `OUTPUT_NAME`). A graph from another framework takes
what its own pipeline made: float NCHW (PyTorch, JAX) or float NHWC (TensorFlow), normalised with its mean and
std, at the size it was trained at. `behind_uint8_input` puts a front of plain ONNX operators before it:

    uint8 NHWC -> float -> NCHW -> Resize to the graph's size (bilinear, antialiased, edges renormalised:
    torch's `interpolate(..., mode="bilinear", antialias=True)` to 1e-7) -> /255, -mean, /std -> the graph's own
    layout and float type

and names its input and output as kdserve's are. A graph that already takes uint8 NHWC (kdserve's own
exports) gets only the resize. Because training's teacher runs exactly this graph (`teachers.OnnxTeacher`)
and export serves it unchanged, what the student was distilled from is what the teacher arm answers: no
second implementation of the preprocessing to drift apart.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kdcontract.errors import UserError
from training.onnx_tools import INPUT_NAME, OUTPUT_NAME

RESIZE_OPSET = 18  # Resize's `antialias` attribute
FLOAT_TYPES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "double"}
PREFIX = "kdserve_front/"


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """A tensor's dimensions, None where symbolic or unknown."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The image input: the one graph input that is not a weight (old exporters list weights as inputs too)."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise UserError(
            f"the ONNX teacher takes {len(inputs)} inputs ({[i.name for i in inputs]}); a teacher takes one"
        )
    return inputs[0]


def describe(value: onnx.ValueInfoProto) -> str:
    elem = value.type.tensor_type.elem_type
    shape = value.type.tensor_type.shape.dim
    dims = [str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in shape]
    return f"{TensorProto.DataType.Name(elem).lower()} [{', '.join(dims)}]"


def input_layout(value: onnx.ValueInfoProto) -> tuple[str, int | None]:
    """("uint8 NHWC" | "NCHW" | "NHWC", the fixed side it takes or None): what the graph's input is."""
    elem, dims = value.type.tensor_type.elem_type, _dims(value)
    if len(dims) == 4:
        if elem == TensorProto.UINT8 and dims[3] == 3:
            return "uint8 NHWC", dims[1] if dims[1] == dims[2] else None
        if elem in FLOAT_TYPES and dims[1] == 3:
            return "NCHW", dims[2] if dims[2] == dims[3] else None
        if elem in FLOAT_TYPES and dims[3] == 3:
            return "NHWC", dims[1] if dims[1] == dims[2] else None
    raise UserError(
        f"the ONNX teacher's input {value.name} is {describe(value)}; a teacher takes uint8 [N, H, W, 3] or "
        "float [N, 3, H, W] / [N, H, W, 3] images"
    )


def check_output(model: onnx.ModelProto, num_classes: int) -> onnx.ValueInfoProto:
    outputs = list(model.graph.output)
    dims = _dims(outputs[0]) if outputs else []
    if len(outputs) != 1 or len(dims) != 2 or dims[1] not in (None, num_classes):
        got = ", ".join(f"{o.name} {describe(o)}" for o in outputs)
        raise UserError(f"the ONNX teacher answers {got}; a teacher answers one [N, {num_classes}] logits output")
    if outputs[0].type.tensor_type.elem_type not in FLOAT_TYPES:
        raise UserError(f"the ONNX teacher's output {outputs[0].name} is {describe(outputs[0])}, not float logits")
    return outputs[0]


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _with_resize_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    if _opset(model) >= RESIZE_OPSET:
        return model
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, RESIZE_OPSET)
    except Exception as exc:  # the converter raises whatever its adapters raise
        raise UserError(
            f"the ONNX teacher's opset {_opset(model)} could not be converted to {RESIZE_OPSET}, which its resize "
            f"needs ({type(exc).__name__}); export it at opset {RESIZE_OPSET} or with a dynamic image size"
        ) from exc


def _rename(graph: onnx.GraphProto, old: str, new: str) -> str:
    """Every use of the tensor `old` in the graph's top level named `new` instead (a classifier's input and
    logits are not captured by subgraphs)."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    return new


def behind_uint8_input(
    model: onnx.ModelProto,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    image_size: int | None = None,
) -> onnx.ModelProto:
    """`model` behind a front taking uint8 [N, H, W, 3] (any H, W) named INPUT_NAME, answering float logits
    named OUTPUT_NAME; images resized to the side the graph takes, or to `image_size` (the size it was trained
    at, declared) where the graph takes any; every mismatch one line (UserError)."""
    original_input = graph_input(model)
    layout, side = input_layout(original_input)
    if image_size is not None and side is not None and image_size != side:
        raise UserError(f"the teacher is declared at image_size {image_size}, but its graph takes {side} x {side}")
    side = side or image_size
    output = check_output(model, num_classes)
    if side is not None:
        model = _with_resize_opset(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's graph stays as it was
    graph = model.graph
    # The graph's own names move aside where they are kdserve's (a graph exported as images -> logits).
    inner_input = (
        _rename(graph, original_input.name, PREFIX + "input")
        if original_input.name == INPUT_NAME
        else original_input.name
    )
    inner_output = _rename(graph, output.name, PREFIX + "output") if output.name == OUTPUT_NAME else output.name
    elem = original_input.type.tensor_type.elem_type
    nodes: list[onnx.NodeProto] = []
    weights: list[onnx.TensorProto] = []

    def step(op: str, inputs: list[str], **attrs) -> str:
        name = f"{PREFIX}{len(nodes)}_{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def constant(name: str, values, dtype) -> str:
        weights.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), PREFIX + name))
        return PREFIX + name

    if layout == "uint8 NHWC" and side is None:  # kdserve's own input already: nothing to do but name it
        step("Identity", [INPUT_NAME])
    else:
        _convert(step, constant, layout, side, mean, std, elem)
    nodes[-1].output[0] = inner_input
    nodes.append(helper.make_node("Cast", [inner_output], [OUTPUT_NAME], name=PREFIX + "logits", to=TensorProto.FLOAT))

    kept_inputs = [i for i in graph.input if i.name != original_input.name]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", "H", "W", 3])])
    graph.input.extend(kept_inputs)
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", num_classes])])
    front, rest = nodes[:-1], list(graph.node)
    del graph.node[:]
    graph.node.extend(front + rest + nodes[-1:])
    graph.initializer.extend(weights)
    onnx.checker.check_model(model)
    return model


def _convert(step, constant, layout: str, side: int | None, mean, std, elem: int) -> None:
    """The front's operators from uint8 NHWC to what the graph takes (see the module's docstring)."""
    x = step("Cast", [INPUT_NAME], to=TensorProto.FLOAT)
    x = step("Transpose", [x], perm=[0, 3, 1, 2])
    if side is not None:
        batch_channels = step(
            "Slice", [step("Shape", [x]), constant("zero", [0], np.int64), constant("two", [2], np.int64)]
        )
        sizes = step("Concat", [batch_channels, constant("side", [side, side], np.int64)], axis=0)
        x = step(
            "Resize",
            [x, "", "", sizes],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
            antialias=1,
            exclude_outside=1,  # the filter's weights outside the image dropped and renormalised, as torch does
        )
    if layout == "uint8 NHWC":  # resized only: back to rounded uint8 pixels
        x = step("Clip", [step("Round", [x]), constant("low", 0.0, np.float32), constant("high", 255.0, np.float32)])
        x = step("Transpose", [x], perm=[0, 2, 3, 1])
        step("Cast", [x], to=TensorProto.UINT8)
        return
    x = step("Div", [x, constant("scale", 255.0, np.float32)])
    x = step("Sub", [x, constant("mean", np.reshape(mean, (1, 3, 1, 1)), np.float32)])
    x = step("Div", [x, constant("std", np.reshape(std, (1, 3, 1, 1)), np.float32)])
    if layout == "NHWC":
        x = step("Transpose", [x], perm=[0, 2, 3, 1])
    if elem != TensorProto.FLOAT:
        step("Cast", [x], to=elem)


def with_input_size(model: onnx.ModelProto, image_size: int, batch: int | None = None) -> onnx.ModelProto:
    """A copy of a graph taking uint8 [N, H, W, 3] that declares [batch or N, image_size, image_size, 3]: what it is
    served with (a fixed size lets TensorRT build one engine, and shape inference count its work)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (batch, image_size, image_size, 3), strict=True):
        dim.Clear()
        if value is None:
            dim.dim_param = "N"
        else:
            dim.dim_value = value
    return model


def graph_macs(model: onnx.ModelProto, image_size: int) -> int:
    """Multiply-accumulates of one image through a graph taking uint8 [N, H, W, 3] (`behind_uint8_input`'s), as
    `training.models.count_macs` counts a network's: its convolutions and matrix products, from the shapes ONNX
    infers for one image of `image_size`."""
    inferred = onnx.shape_inference.infer_shapes(with_input_size(model, image_size, batch=1), data_prop=True).graph
    shapes = {v.name: _dims(v) for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    shapes.update({t.name: list(t.dims) for t in inferred.initializer})
    total = 0
    for node in inferred.node:
        out = shapes.get(node.output[0])
        if node.op_type not in ("Conv", "Gemm", "MatMul") or not out or None in out:
            continue
        weight = shapes.get(node.input[1])
        if not weight or None in weight:
            continue
        if node.op_type == "Conv":  # weight [out, in / groups, kh, kw]: each output element reads in/groups*kh*kw
            total += int(np.prod(out)) * int(np.prod(weight[1:]))
        else:
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            total += int(np.prod(out)) * int(weight[-1] if transposed else weight[-2])
    return total


def graph_params(model: onnx.ModelProto) -> int:
    """The graph's weights (its initializers), as `training.models.count_params` counts a network's; the front's
    few constants are not weights."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if not t.name.startswith(PREFIX))
