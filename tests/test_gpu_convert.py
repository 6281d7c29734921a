"""GPU: `mamba-dist convert export-mamba-ssm` output loads with mamba_ssm's own
`MambaLMHeadModel.from_pretrained(local_dir)` (no network), gives our logits (fp32, norm-wise relative error
<= 1e-5) and mamba_ssm's greedy `generate` gives the tokens of our recurrent step, both with our fused backend
(mamba_ssm's selective_state_update kernel on CUDA) and with the reference step on CPU. Both mixers.

Run through the device tool (see scripts/gpu_check.sh for staging the kernels):
    TRITON_F32_DEFAULT=ieee python -m pytest -q -m gpu tests/test_gpu_convert.py
"""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")  # before any Triton kernel compiles
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from_pretrained reads the local directory only

import pytest  # noqa: E402
import torch  # noqa: E402

from mamba_dist.model import MambaConfig, MambaLMHeadModel  # noqa: E402
from mamba_dist.model.backend import fused_unavailable_reason  # noqa: E402

_why = fused_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why is not None, reason=f"fused kernels unavailable: {_why}")]

TOL = 1e-5
NEW = 32
# Mamba-2 head sizes of tests/test_gpu_mamba_ssm.py (chunk 16, headdim 16, d_state 32, 8 heads): Triton autotuning
# is paid once per shape set
CONFIGS = {
    "Mamba1": dict(d_model=64, n_layer=2, vocab_size=257, ssm_cfg={"layer": "Mamba1", "d_state": 16}),
    "Mamba2": dict(d_model=64, n_layer=2, vocab_size=257,
                   ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 16, "ngroups": 2, "chunk_size": 16}),
}


@pytest.fixture(scope="module", autouse=True)
def _short_autotune():
    from _gpu_autotune import limit_triton_autotune

    limit_triton_autotune()


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def trained_on_the_spot(cfg: MambaConfig) -> MambaLMHeadModel:
    """A few AdamW steps on CPU (reference backend) from mamba_ssm's init, on a repeated byte text."""
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg, backend="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    text = torch.tensor([list(b"To be, or not to be, that is the question. " * 3)])
    for _ in range(5):
        logits = model(text[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("mixer", list(CONFIGS))
def test_mamba_ssm_loads_the_export_and_generates_our_tokens(tmp_path, mixer):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as SSMLMHeadModel

    from mamba_dist.convert import export_mamba_ssm, target
    from mamba_dist.convert.generate import generate, load_model

    cfg = MambaConfig(**CONFIGS[mixer])
    ours = trained_on_the_spot(cfg)
    ck = str(tmp_path / "ckpt")
    target.write_checkpoint(ck, cfg, 1, ours.state_dict().items())
    out = export_mamba_ssm(ck, str(tmp_path / "export"), tokenizer="byte", progress=False)

    theirs = SSMLMHeadModel.from_pretrained(out, device="cuda", dtype=torch.float32).eval()
    fused, _ = load_model(out, device="cuda")  # what `mamba-dist generate` runs on the export
    assert fused.backend == "fused"  # the recurrent step is mamba_ssm's selective_state_update
    reference, _ = load_model(out, device="cpu")

    prompt = list(b"To be, or not")
    ids = torch.tensor([prompt, list(b"that is the q")], device="cuda")
    with torch.no_grad():
        want = theirs(ids).logits
        err_fused = rel(fused(ids), want)
        err_ref = rel(reference(ids.cpu()), want.cpu())
    print(f"{mixer}: logits rel err fused {err_fused:.2e}, reference {err_ref:.2e}")
    assert err_fused <= TOL and err_ref <= TOL

    seq = theirs.generate(torch.tensor([prompt], device="cuda"), max_length=len(prompt) + NEW, top_k=1)
    theirs_new = seq[0, len(prompt):].tolist()
    assert len(theirs_new) == NEW
    ours_fused = generate(fused, prompt, NEW, temperature=0)
    ours_ref = generate(reference, prompt, NEW, temperature=0)
    print(f"{mixer}: mamba_ssm {bytes(t for t in theirs_new if t < 256)!r}")
    assert ours_fused == theirs_new
    assert ours_ref == theirs_new
