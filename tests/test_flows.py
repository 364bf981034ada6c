"""Invertibility, log-determinants and the block contract."""
import pytest
import torch

from invint_hub.cinn import ConditionalINN
from invint_hub.flows import ActNorm, AffineCoupling, DoubleAffineCoupling, Flow, FlowBlock, Shuffle


def _blocks(dim=6, cond=3):
    torch.manual_seed(0)
    return {
        "actnorm": ActNorm(dim),
        "coupling": AffineCoupling(dim, cond, hidden=16, depth=1),
        "double_coupling": DoubleAffineCoupling(dim, cond, hidden=16, depth=1),
        "shuffle": Shuffle(dim, seed=3),
        "flow_block": FlowBlock(dim, cond, hidden=16, depth=1, seed=1),
        "flow": Flow(dim, cond, n_flows=3, hidden=16, depth=1),
    }


def _randomize(block):
    """Non-trivial parameters (fresh couplings are near the identity only by chance; ActNorm starts as identity)."""
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for m in block.modules():
        if isinstance(m, ActNorm):
            m.initialized.fill_(1)
    return block


@pytest.mark.parametrize("name", ["actnorm", "coupling", "double_coupling", "shuffle", "flow_block", "flow"])
@pytest.mark.parametrize("batch", [1, 5])
def test_block_inverse_and_logdet_contract(name, batch):
    block = _randomize(_blocks()[name]).eval()
    x, c = torch.randn(batch, 6), torch.randn(batch, 3)
    y, ld = block(x, c)
    x2, ld_inv = block.inverse(y, c)
    assert y.shape == x.shape and ld.shape == (batch,) and ld_inv.shape == (batch,)
    assert (x2 - x).abs().max() < 1e-4
    assert torch.allclose(ld_inv, -ld, atol=1e-5)
    if name != "shuffle":
        assert not torch.allclose(y, x)  # the block does something


@pytest.mark.parametrize("name", ["actnorm", "coupling", "double_coupling", "flow_block", "flow"])
def test_logdet_matches_numerical_jacobian(name):
    block = _randomize(_blocks(dim=4, cond=2)[name]).double().eval()
    x, c = torch.randn(3, 4, dtype=torch.double), torch.randn(3, 2, dtype=torch.double)
    _, ld = block(x, c)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda xi: block(xi[None], c[i : i + 1])[0][0], x[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        assert abs(ld[i].item() - expected.item()) < 1e-6, (name, ld[i].item(), expected.item())


def test_actnorm_data_dependent_init_once_and_persistent():
    norm = ActNorm(3).train()
    x = torch.randn(256, 3) * torch.tensor([2.0, 0.5, 3.0]) + torch.tensor([1.0, -2.0, 0.0])
    y, _ = norm(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(3), atol=1e-3)
    assert norm.initialized.item() == 1
    loc = norm.loc.clone()
    norm(x * 10)  # a second batch must not re-initialise
    assert torch.equal(norm.loc, loc)
    # the flag travels in the state dict: a fresh module with the loaded state never re-initialises
    fresh = ActNorm(3).train()
    fresh.load_state_dict(norm.state_dict())
    fresh(x * 10)
    assert torch.equal(fresh.loc, loc)
    assert "initialized" in norm.state_dict()


def test_actnorm_spatial():
    norm = ActNorm(4).train()
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    y, ld = norm(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(ld, torch.full((8,), 25 * norm.log_scale.sum().item()))
    x2, _ = norm.inverse(y)
    assert (x2 - x).abs().max() < 1e-4


def test_shuffle_uses_local_generator_and_is_stored():
    torch.manual_seed(0)
    a = Shuffle(10, seed=5)
    torch.manual_seed(123)
    b = Shuffle(10, seed=5)
    assert torch.equal(a.perm, b.perm)  # independent of the global RNG
    assert not torch.equal(Shuffle(10, seed=6).perm, a.perm)
    assert {"perm", "inv_perm"} <= set(a.state_dict())
    state = torch.get_rng_state()
    Shuffle(10, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_coupling_log_scale_is_bounded():
    c = AffineCoupling(4, 0, hidden=8, depth=1)
    with torch.no_grad():
        for p in c.parameters():
            p.mul_(100)
    _, ld = c(torch.randn(16, 4) * 100)
    assert ld.abs().max() <= 2.0 + 1e-5  # two transformed dims, |s| < 1 each


@pytest.mark.parametrize("cond_shape", [[7], [6, 8, 8], [5, 13, 13]])
@pytest.mark.parametrize("batch", [1, 4])
def test_conditional_inn_invertible(cond_shape, batch):
    torch.manual_seed(0)
    t = ConditionalINN(latent_dim=10, cond_shape=cond_shape, embed_dim=6, n_flows=3, hidden=16, depth=1,
                       embedder_depth=2, embedder_width=4)
    zbar, z = torch.randn(batch, 10), torch.randn(batch, *cond_shape)
    t.train()
    t(torch.randn(32, 10), torch.randn(32, *cond_shape))  # data-dependent init on a separate batch
    t.eval()
    v, ld = t(zbar, z)
    back, ld_inv = t.inverse(v, z, return_logdet=True)
    assert v.shape == (batch, 10)
    assert (back - zbar).abs().max() < 1e-4
    assert torch.allclose(ld_inv, -ld, atol=1e-4)
    # the condition matters
    assert (t.inverse(v, z + 1.0) - zbar).abs().max() > 1e-3


def test_conditional_inn_sample_shapes_and_temperature():
    torch.manual_seed(0)
    t = ConditionalINN(latent_dim=8, cond_shape=[3], embed_dim=4, n_flows=2, hidden=8, depth=1, embedder_depth=1).eval()
    z = torch.randn(2, 3)
    s = t.sample(z, n=5, generator=torch.Generator().manual_seed(1))
    assert s.shape == (10, 8)
    s2 = t.sample(z, n=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s, s2)
    zero = t.sample(z, n=3, temperature=0.0)
    assert torch.allclose(zero[0], zero[1]) and torch.allclose(zero[0], t.inverse(torch.zeros(1, 8), z[:1])[0])
    with pytest.raises(ValueError):
        t.sample(z, temperature=-1)


def test_conditional_inn_rejects_wrong_shapes():
    t = ConditionalINN(latent_dim=8, cond_shape=[3], embed_dim=4, n_flows=1, hidden=8, depth=1, embedder_depth=1)
    with pytest.raises(ValueError, match="latents"):
        t(torch.randn(2, 7), torch.randn(2, 3))
    with pytest.raises(ValueError, match="representations"):
        t(torch.randn(2, 8), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch"):
        t(torch.randn(2, 8), torch.randn(3, 3))


def test_paper_configuration_is_expressible():
    """Latent 128, 20 flows, subnet width 1024, depth 2 from constructor arguments (config) alone."""
    cfg = dict(latent_dim=128, cond_shape=[4096], embed_dim=128, n_flows=20, hidden=1024, depth=2, embedder_depth=3)
    with torch.device("meta"):
        t = ConditionalINN(**cfg)
    n = sum(p.numel() for p in t.flow.parameters())
    # 20 blocks x 2 couplings x 2 subnets x (192*1024 + 2*1024^2 + 1024*64 + biases) + ActNorms
    per_net = 192 * 1024 + 1024 + 2 * (1024 * 1024 + 1024) + 1024 * 64 + 64
    assert n == 20 * (4 * per_net + 2 * 128)
    assert len(t.flow.blocks) == 20
