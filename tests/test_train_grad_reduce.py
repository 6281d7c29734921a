"""Data parallelism without the DDP wrapper (what CUDA graphs over several replicas run: a captured backward cannot
carry DDP's hooks): TorchPath.reduce_in_step averages the gradients over the DP group once per step
(mamba_dist.parallel.grads). On 2 gloo ranks with different data and gradient accumulation it must give the
weights DDP gives, and a bucket limit smaller than one tensor must change nothing."""

import torch

from _dist_utils import run_ranks


def _worker(rank, world, bucket_mb):
    import mamba_dist.parallel.grads as grads
    from mamba_dist import train as T
    from mamba_dist.config import load_config, validate_runtime
    from mamba_dist.model import MambaLMHeadModel
    from mamba_dist.parallel.dims import ParallelDims

    cfg = load_config(None, ["model.d_model=32", "model.n_layer=2", "model.vocab_size=64", "data.path=synthetic",
                             "data.seq_len=32", "train.micro_batch_size=2", f"train.global_batch_tokens={2 * 32 * 2 * world}",
                             "train.max_steps=3", "train.device=cpu", "optim.grad_clip=0.5", "optim.lr=1e-2"])
    derived = validate_runtime(cfg, world)
    dims = ParallelDims.from_env(cfg.parallel).build()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    data = [[torch.randint(0, 64, (2, 33), generator=g) for _ in range(2)] for _ in range(3)]
    seq = torch.zeros(2, 32, dtype=torch.int32)
    out = {}
    for mode in ("ddp", "reduce_in_step"):
        torch.manual_seed(0)  # identical initial weights on every rank, as the trainer seeds them
        model = MambaLMHeadModel(cfg.model.to_mamba_config(), backend="reference")
        if mode == "ddp":
            path = T.build_training(model, cfg, derived, dims, torch.device("cpu"))
            assert isinstance(path.model, torch.nn.parallel.DistributedDataParallel)
        else:
            model = T.parallelize_model(model, dims, cfg, torch.device("cpu"), ddp=False)
            opt = T.build_optimizer(model, cfg)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(cfg, derived.total_steps))
            path = T.TorchPath(model, opt, sched, cfg, dims)
            path.reduce_in_step = True
            if bucket_mb:
                orig = grads.all_reduce_grads_
                grads.all_reduce_grads_ = lambda p, gr, w: orig(p, gr, w, bucket_mb=bucket_mb)
        norms = []
        for step in data:
            loss, norm, applied = T.train_step(path, [(x[:, :-1], x[:, 1:], seq) for x in step], dims, False, False)
            assert applied
            norms.append(float(norm))
        out[mode] = ({n: p.detach().clone() for n, p in T.unwrap(path.model).named_parameters()}, norms)
    (p_ddp, n_ddp), (p_red, n_red) = out["ddp"], out["reduce_in_step"]
    worst = max(((p_ddp[k] - p_red[k]).abs().max() / p_ddp[k].abs().max().clamp_min(1e-12)).item() for k in p_ddp)
    return worst, n_ddp, n_red, p_red["backbone.embedding.weight"].sum().item()


def test_reduce_in_step_equals_ddp():
    for bucket_mb in (0, 0.001):  # default buckets; buckets smaller than a tensor (one all-reduce per tensor)
        res = run_ranks(_worker, 2, bucket_mb)
        for worst, n_ddp, n_red, _ in res:
            assert worst < 1e-6, worst
            assert max(abs(a - b) / a for a, b in zip(n_ddp, n_red)) < 1e-6
        assert res[0][3] == res[1][3]  # the replicas stay identical


def test_cuda_graphs_decision():
    # which runs capture (train.cuda_graphs): decided from the config and the layout only, so it is checked here
    # without a GPU (a "cuda" device object is enough)
    from types import SimpleNamespace

    from mamba_dist.config import load_config
    from mamba_dist.train import use_cuda_graphs

    cuda = torch.device("cuda")

    def decide(over, dp=1, tp=1, device=cuda):
        cfg = load_config(None, ["model.d_model=32", "model.n_layer=2", "data.path=synthetic",
                                 "train.max_steps=1", *over])
        dims = SimpleNamespace(tp_enabled=tp > 1, distributed=dp * tp > 1, dp=dp)
        return use_cuda_graphs(cfg, dims, device, "fused")

    assert decide(["model.mixer=Mamba2", "model.ssm_cfg={headdim: 16}"])  # auto: Mamba-2, one replica
    assert not decide(["model.mixer=Mamba2", "model.ssm_cfg={headdim: 16}"], device=torch.device("cpu"))
    assert decide(["model.mixer=Mamba1"])  # auto: Mamba-1 through mamba1_inner + StaticPacking
    assert not decide(["model.mixer=Mamba1", "model.ssm_cfg={d_conv: 5}"])  # outside mamba1_inner: eager
    assert not decide(["model.mixer=Mamba1", "train.ac_fraction=0.5"])  # recomputation: auto stays eager
    assert decide(["model.mixer=Mamba1", "train.cuda_graphs=true"])  # mamba1_inner + StaticPacking capture
    assert not decide(["model.mixer=Mamba1", "train.cuda_graphs=true", "model.ssm_cfg={use_fast_path: false}"])
    assert decide(["model.mixer=Mamba1", "train.cuda_graphs=true", "model.d_model=36"])  # d_inner 72: 8 | 72
    assert not decide(["model.mixer=Mamba1", "train.cuda_graphs=true", "model.d_model=30"])  # d_inner 60
    assert not decide(["model.mixer=Mamba1", "train.cuda_graphs=true", "model.ssm_cfg={d_conv: 5}"])
    m2 = ["model.mixer=Mamba2", "model.ssm_cfg={headdim: 16}"]
    assert not decide(m2, dp=2) and decide([*m2, "train.cuda_graphs=true"], dp=2)  # replicas: only when asked
    assert not decide([*m2, "train.cuda_graphs=true"], tp=2)
    assert not decide([*m2, "train.cuda_graphs=true", "parallel.zero_stage=1"])
    assert not decide([*m2, "train.cuda_graphs=false"])
