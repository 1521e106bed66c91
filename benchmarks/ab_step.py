"""Training steps of ResNet-18 (width 64) or the 3-D VolumeNet through StreamingModel, as one
whole process (export, compile, sessions, steps), for timing two checkouts against each other::

    PYTHONPATH=/path/to/checkout python benchmarks/ab_step.py SIZE TILE STEPS [volume]

PYTHONPATH picks the checkout; older checkouts without the ``zoo`` package take the models from
their ``benchmarks`` package. Prints each step's seconds and loss on stderr (equal losses on both
sides: the same computation). benchmarks/results/architecture_ab.json holds the pairs measured.
"""
import io
import sys
import time
import warnings

import onnx
import torch

try:
    from zoo import VolumeNet, randomize_batchnorm, resnet18
except ImportError:
    from benchmarks.resnets import randomize_batchnorm, resnet18
    from benchmarks.volumes import VolumeNet
from streamc.compiler import compile as compile_program
from streamc.runtime.module import StreamingModel

size, tile, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
volume = len(sys.argv) > 4
torch.set_num_threads(2)
torch.manual_seed(0)
module = randomize_batchnorm(VolumeNet(classes=2, width=16) if volume else resnet18()).eval()
dims = 3 if volume else 2
example = (1, 1 if volume else 3) + (32 if volume else 224,) * dims
buf = io.BytesIO()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.onnx.export(module, torch.zeros(example), buf, dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {k: f"s{k}" for k in range(2, 2 + dims)}})
model = onnx.load_from_string(buf.getvalue())
program = compile_program(model, tile=tile, image=(size,) * dims)
sm = StreamingModel(program, threads=2, progress=False)
opt = torch.optim.SGD(sm.parameters(), lr=1e-4)
x = torch.randn(example[:2] + (size,) * dims, generator=torch.Generator().manual_seed(0))
y = torch.tensor([1])
for i in range(steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(sm(x), y)
    loss.backward()
    opt.step()
    print(i, round(time.perf_counter() - t, 2), round(loss.item(), 6), file=sys.stderr)
