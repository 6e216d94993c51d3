"""A short tour of the model library: build a variant, run it, look inside.

Run with ``.venv/bin/python examples/quickstart.py``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import cait

torch.manual_seed(0)
print(f"{len(cait.list_models())} variants:", ", ".join(cait.list_models()))

# One real image: a handwritten digit from scikit-learn (8x8, values 0-16), as a 32x32 RGB.
digits = load_digits()
image = torch.from_numpy(digits.images[0].astype(np.float32) / 16.0)
x = F.interpolate(image[None, None], size=(32, 32), mode="bicubic").expand(1, 3, 32, 32)

model = cait.create_model("cait_tiny_32").eval()
params = sum(p.numel() for p in model.parameters())
print(f"cait_tiny_32: {params / 1e6:.2f}M parameters, config {model.config}")

with torch.no_grad():
    logits = model(x)
    out = model.forward_trace(x)
print(
    "logits",
    tuple(logits.shape),
    "| same as forward_trace:",
    torch.allclose(logits, out.logits, atol=1e-5),
)
cls_attn = out.ca[-1].attn[0, :, 0, 1:]  # (H, N): where each head of the last CA block looks
print("last class-attention block, head 0, as an 8x8 map over the patches:")
print(np.array2string(cls_attn[0].reshape(8, 8).numpy(), precision=3, suppress_small=True))
for i, trace in enumerate(out.sa):
    ratio = trace.attn_branch.norm() / trace.stream.norm()
    print(f"SA block {i}: |LayerScale * attention branch| / |residual stream| = {ratio:.4f}")
# Any resolution that is a multiple of the patch size works: position embeddings are resized.
with torch.no_grad():
    print("at 48x48:", tuple(model(F.interpolate(x, size=(48, 48))).shape))
