"""Point clouds that stress neighbor search: uniform, clustered, duplicated, on a lattice (ties)."""
import torch


def make_cloud(kind, B, N, D=3, *, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        x = torch.rand(B, N, D, generator=g, dtype=torch.float64)
    elif kind == "clustered":
        centers = torch.rand(B, 4, D, generator=g, dtype=torch.float64) * 10
        which = torch.randint(0, 4, (B, N), generator=g)
        x = centers[torch.arange(B)[:, None], which] + 0.05 * torch.randn(B, N, D, generator=g, dtype=torch.float64)
    elif kind == "duplicated":
        base = torch.rand(B, max(1, N // 4), D, generator=g, dtype=torch.float64)
        x = base[:, torch.randint(0, base.shape[1], (N,), generator=g)]
    elif kind == "lattice":
        x = torch.randint(0, 4, (B, N, D), generator=g).to(torch.float64)
    elif kind == "surface":
        v = torch.randn(B, N, D, generator=g, dtype=torch.float64)
        x = v / v.norm(dim=-1, keepdim=True)
    else:
        raise ValueError(kind)
    return x.to(dtype=dtype, device=device)


KINDS = ["uniform", "clustered", "duplicated", "lattice", "surface"]
