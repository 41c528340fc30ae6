"""A brought ONNX graph behind kdserve's uint8 NHWC input (`training.onnx_front`): what it answers is what the
network answers on the images prepared as its own framework would (resized, scaled, normalised, in its layout)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch.nn import functional as F

from kdcontract.errors import UserError
from kdcontract.ort_session import open_session
from training.models import build_network, count_macs
from training.onnx_front import behind_uint8_input, graph_macs, graph_params

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Net(torch.nn.Module):
    """A small classifier of float images in `layout`."""

    def __init__(self, layout: str = "NCHW", classes: int = 10, any_size: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layout, self.any_size = layout, any_size
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Linear(8 if any_size else 8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        x = torch.relu(self.conv(x))
        x = x.mean((2, 3)) if self.any_size else F.adaptive_avg_pool2d(x, 4)  # 4x4 cells: where things are counts
        return self.head(x.flatten(1))


def exported(net: torch.nn.Module, shape: tuple, names=("input", "output"), opset=18, dynamic_size=False, dtype=None):
    spatial = (1, 2) if shape[-1] == 3 else (2, 3)  # NHWC or NCHW
    axes = {names[0]: {0: "n"} | (dict(zip(spatial, "hw", strict=True)) if dynamic_size else {}), names[1]: {0: "n"}}
    out = io.BytesIO()
    example = torch.zeros(shape, dtype=dtype or torch.float32)
    torch.onnx.export(
        net.eval(), (example,), out, input_names=[names[0]], output_names=[names[1]], dynamic_axes=axes,
        opset_version=opset, dynamo=False,
    )  # fmt: skip
    return onnx.load_from_string(out.getvalue())


def answers(graph: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return open_session(graph.SerializeToString()).run(["logits"], {"images": images})[0]


def as_its_framework_would(net: Net, images: np.ndarray, side: int | None) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if side is not None and side != x.shape[-1]:
        x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    x = (x / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    if net.layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    with torch.no_grad():
        return net.eval()(x).numpy()


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("layout", "shape", "opset", "dynamic_size"),
    [("NCHW", (1, 3, 32, 32), 18, False),   # PyTorch / JAX at another size: resized up, 8 -> 32
     ("NCHW", (1, 3, 32, 32), 17, False),   # an older opset: converted to 18 for the antialiased Resize
     ("NHWC", (1, 32, 32, 3), 18, False),   # TensorFlow's layout
     ("NCHW", (1, 3, 8, 8), 17, True)],     # any size: fed at the dataset's
)  # fmt: skip
def test_a_float_graph_answers_as_on_images_its_own_framework_prepared(layout, shape, opset, dynamic_size):
    net = Net(layout, any_size=dynamic_size)
    graph = behind_uint8_input(exported(net, shape, opset=opset, dynamic_size=dynamic_size), 10, MEAN, STD)
    side = None if dynamic_size else shape[2]
    np.testing.assert_allclose(answers(graph, IMAGES), as_its_framework_would(net, IMAGES, side), rtol=1e-4, atol=1e-5)
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["logits"]


def test_a_graph_of_any_size_is_fed_the_size_declared_and_a_fixed_one_must_match_it():
    net = Net(any_size=True)
    graph = behind_uint8_input(exported(net, (1, 3, 8, 8), dynamic_size=True), 10, MEAN, STD, image_size=32)
    np.testing.assert_allclose(answers(graph, IMAGES), as_its_framework_would(net, IMAGES, 32), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match=r"declared at image_size 16, but its graph takes 32 x 32"):
        behind_uint8_input(exported(Net(), (1, 3, 32, 32)), 10, MEAN, STD, image_size=16)


def test_shrinking_is_antialiased_as_torch_does():
    net = Net()
    graph = behind_uint8_input(exported(net, (1, 3, 8, 8)), 10, MEAN, STD)
    large = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(answers(graph, large), as_its_framework_would(net, large, 8), rtol=1e-4, atol=1e-5)


def test_a_uint8_graph_named_as_kdserves_keeps_its_pixels_and_gets_kdserves_names():
    class Uint8Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net(any_size=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2).float() / 255)

    net = Uint8Net().eval()
    with torch.no_grad():
        want = net(torch.from_numpy(IMAGES)).numpy()
    for any_size in (False, True):  # resized to its 8 px (a no-op here), or handed the pixels as they are
        graph = exported(net, (1, 8, 8, 3), ("images", "logits"), dynamic_size=any_size, dtype=torch.uint8)
        graph = behind_uint8_input(graph, 10, MEAN, STD)
        np.testing.assert_allclose(answers(graph, IMAGES), want, rtol=1e-5, atol=1e-6)
    # Of any size, nothing is done to its pixels: its input and its logits are only named as kdserve's.
    assert [n.op_type for n in graph.graph.node if n.name.startswith("kdserve_front/")] == ["Identity", "Cast"]


def test_its_work_and_weights_are_counted_from_the_graph_as_a_networks_are():
    net = build_network("mobilenet_v3_small", 10, small_stem=True).eval()
    graph = behind_uint8_input(exported(net, (1, 3, 16, 16)), 10, MEAN, STD)

    class Prepared(torch.nn.Module):  # what count_macs is given: uint8 NHWC in
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.permute(0, 3, 1, 2).float())

    assert graph_macs(graph, 16) == count_macs(Prepared(), 16) > 0  # its batch norms folded by the exporter
    plain = Net()  # no batch norm: the graph's weights are the network's
    assert graph_params(behind_uint8_input(exported(plain, (1, 3, 8, 8)), 10, MEAN, STD)) == sum(
        p.numel() for p in plain.parameters()
    )


def test_what_cannot_be_a_teacher_is_one_line():
    with pytest.raises(UserError, match=r"answers output float \[n, 7\]; a teacher answers one \[N, 10\] logits"):
        behind_uint8_input(exported(Net(classes=7), (1, 3, 8, 8)), 10, MEAN, STD)
    with pytest.raises(UserError, match=r"input input is int64 \[n, 3, 8, 8\]; a teacher takes uint8"):
        behind_uint8_input(exported(Counts(), (1, 3, 8, 8), dtype=torch.int64), 10, MEAN, STD)


class Counts(Net):
    """A graph taking integers: not an image input a teacher can be fed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float())
