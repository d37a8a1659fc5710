"""Per block: each family's transformer at its real width with one block of each kind (zoo's "small"
config: DiT-S/2 for DiT), eager diffusers vs ``dit_kernels.patch``, in one benchmark group per family.

On a GPU: bf16 at the real 1024 px shapes of the traffic model (256 px for DiT), the Triton kernels.
On CPU: fp32, the families' tiny configs (a real-width block takes seconds on 2 cores) at a 16 x 16 latent
with 32 text tokens, the torch reference ops: a check that the patched path costs no more than eager's
on CPU; the speed is on the GPU."""

import copy

import pytest
import torch

import dit_kernels
from dit_kernels.bench import zoo
from dit_kernels.models import FAMILY_MODULES, family_named

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _shape(family: str) -> zoo.Shape:
    if DEVICE.type == "cuda":
        return family_named(family).traffic_shape
    return zoo.Shape(1, 16, 16, min(32, zoo.default_text_len(family, family_named(family).configs["tiny"])))


@pytest.fixture(scope="module", params=FAMILY_MODULES)
def models(request):
    """(family, eager model, patched copy, inputs), built once per family."""
    family = request.param
    torch.manual_seed(0)
    eager = zoo.build(family, "small" if DEVICE.type == "cuda" else "tiny").to(DEVICE, DTYPE)
    patched = copy.deepcopy(eager)
    dit_kernels.patch(patched)
    inputs = zoo.transformer_inputs(family, eager, _shape(family), DTYPE, DEVICE)
    return family, eager, patched, inputs


@pytest.mark.parametrize("path", ["eager", "patched"])
def test_block_forward(benchmark, timed, models, path):
    family, eager, patched, inputs = models
    model = eager if path == "eager" else patched

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    forward()  # warm-up: compiles Triton kernels before timing
    shape = _shape(family)
    benchmark.group = f"blocks {family} {DTYPE} latent {shape.height}x{shape.width} text {shape.text_len}"
    timed(forward, cpu_rounds=3)
