"""gumbelkit.nn: each module against plain float64 formulas on the same noise, its sampling
distribution (chi-square, fixed seed, p > 1e-3), and exact enumeration for the VAE bounds."""

import doctest
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import gumbelkit as gk
import gumbelkit.nn
import reference as ref
from gumbelkit.nn import CategoricalVAE, GumbelSoftmax, GumbelVectorQuantizer
from gumbelkit.schedules import LearnableTemperature


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def chisquare_p(indices, probs):
    counts = torch.bincount(indices.flatten(), minlength=probs.numel()).double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    return stats.chisquare(counts.numpy(), expected.numpy()).pvalue


def test_docstring_examples():
    result = doctest.testmod(gumbelkit.nn, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- GumbelSoftmax

@pytest.mark.parametrize("hard, log", [(False, False), (True, False), (False, True)])
def test_layer_train_mode_is_the_functional_sample(hard, log):
    logits = torch.randn(5, 7, generator=gen(1))
    mask = torch.rand(5, 7, generator=gen(2)) > 0.3
    mask[:, 0] = True
    layer = GumbelSoftmax(tau=0.7, hard=hard, log=log)
    y = layer(logits, generator=gen(3), mask=mask)
    noise = gk.gumbel_noise_like(logits, generator=gen(3))  # the noise contract
    soft = ref.gumbel_softmax(logits, noise, 0.7, mask=mask)
    if log:
        torch.testing.assert_close(y.double(), ref.log_gumbel_softmax(logits, noise, 0.7, mask=mask),
                                   rtol=1e-5, atol=1e-5)
    elif hard:
        assert torch.equal(y, F.one_hot(soft.argmax(-1), 7).float())
    else:
        torch.testing.assert_close(y.double(), soft, rtol=1e-5, atol=1e-6)


def test_layer_eval_modes():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 5.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    expected_argmax = torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]])
    expected_soft = torch.softmax((logits / 0.5).masked_fill(~mask, float("-inf")), -1)
    for log in (False, True):
        layer = GumbelSoftmax(tau=0.5, log=log, eval_mode="argmax").eval()
        out = layer(logits, mask=mask)
        assert torch.equal(out, expected_argmax.log() if log else expected_argmax)
        layer.eval_mode = "softmax"
        out = layer(logits, mask=mask)
        torch.testing.assert_close(out, expected_soft.log() if log else expected_soft)
    # "sample" samples in eval mode too, exactly like training mode
    layer = GumbelSoftmax(tau=0.5, hard=True).eval()
    assert torch.equal(layer(logits, generator=gen(4)), layer.train()(logits, generator=gen(4)))


def test_layer_hard_samples_follow_the_categorical():
    # argmax((logits + g) / tau) ~ Categorical(softmax(logits)) whatever tau: chi-square p > 1e-3
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    layer = GumbelSoftmax(tau=0.3, hard=True)
    y = layer(probs.log().expand(20_000, 4), generator=gen(5))
    assert chisquare_p(y.argmax(-1), probs) > 1e-3


def test_layer_learnable_tau_gradient_matches_float64_reference():
    logits = torch.randn(6, 5, generator=gen(6), requires_grad=True)
    temp = LearnableTemperature(init=0.8, tau_min=0.1, shape=(6, 1))
    weights = torch.randn(6, 5, generator=gen(7))
    (GumbelSoftmax(tau=temp)(logits, generator=gen(8)) * weights).sum().backward()
    # float64 reference on the same noise, through plain autograd
    logits64 = logits.detach().double().requires_grad_()
    raw64 = temp.raw.detach().double().requires_grad_()
    tau64 = 0.1 + F.softplus(raw64)
    noise = gk.gumbel_noise_like(logits, generator=gen(8))
    (ref.gumbel_softmax(logits64, noise, tau64) * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(temp.raw.grad.double(), raw64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("eval_mode", ["sample", "argmax", "softmax"])
def test_layer_no_grad_eval_float64(eval_mode):
    layer = GumbelSoftmax(tau=0.5, hard=eval_mode == "sample", eval_mode=eval_mode).eval()
    logits = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = layer(logits, generator=gen())
    assert out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(layer(torch.randn(2, 4, dtype=torch.bfloat16), generator=gen())).all()


def test_layer_rejects_bad_settings_and_input():
    with pytest.raises(ValueError, match="hard=True and log=True"):
        GumbelSoftmax(hard=True, log=True)
    with pytest.raises(ValueError, match="eval_mode"):
        GumbelSoftmax(eval_mode="mode")
    with pytest.raises(ValueError, match="tau"):
        GumbelSoftmax(tau=0.0)
    with pytest.raises(TypeError, match="tau"):
        GumbelSoftmax(tau="1")
    layer = GumbelSoftmax(eval_mode="argmax").eval()
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="no allowed category"):
        layer(torch.zeros(1, 2), mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="logits"):
        layer(torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- quantizer

def codebook_reference(vq, x, seed):
    """wav2vec 2.0 quantization in float64 on the same noise: ST one-hot times codebook."""
    logits = F.linear(x.double(), vq.weight_proj.weight.double(), vq.weight_proj.bias.double())
    logits = logits.unflatten(-1, (vq.groups, vq.num_vars))
    noise = gk.gumbel_noise_like(logits.float(), generator=gen(seed))
    soft = ref.gumbel_softmax(logits, noise, vq.tau)
    hard = F.one_hot(soft.argmax(-1), vq.num_vars).double()
    onehot = hard - soft.detach() + soft
    q = torch.einsum("...gv,gvd->...gd", onehot, vq.codebook.double()).flatten(-2)
    return q, logits, hard


def test_quantizer_matches_reference_forward_and_backward():
    vq = GumbelVectorQuantizer(dim=12, num_vars=6, groups=3, vq_dim=9, tau=0.8)
    x = torch.randn(4, 5, 12, generator=gen(10))
    out = vq(x, generator=gen(11))
    q_ref, logits_ref, hard = codebook_reference(vq, x, 11)
    torch.testing.assert_close(out.x.double(), q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits.double(), logits_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.codes, hard.argmax(-1))
    # the chosen codebook vectors, group by group
    chosen = torch.stack([vq.codebook[g, out.codes[..., g]] for g in range(3)], -2).flatten(-2)
    torch.testing.assert_close(out.x, chosen)
    # backward: the straight-through gradient reaches the projection and the codebook
    w = torch.randn(4, 5, 9, generator=gen(12))
    (out.x * w).sum().backward()
    params = [vq.weight_proj.weight, vq.codebook]
    ref_grads = torch.autograd.grad((q_ref * w.double()).sum(), [logits_ref], retain_graph=True)
    assert ref_grads[0].abs().sum() > 0
    p64 = [p.detach().double().requires_grad_() for p in params]
    logits64 = F.linear(x.double(), p64[0], vq.weight_proj.bias.double()).unflatten(-1, (3, 6))
    noise = gk.gumbel_noise_like(logits64.float(), generator=gen(11))
    soft = ref.gumbel_softmax(logits64, noise, 0.8)
    onehot = F.one_hot(soft.argmax(-1), 6).double() - soft.detach() + soft
    q64 = torch.einsum("...gv,gvd->...gd", onehot, p64[1]).flatten(-2)
    (q64 * w.double()).sum().backward()
    for p, r in zip(params, p64, strict=True):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_quantizer_perplexities_and_diversity_loss():
    vq = GumbelVectorQuantizer(dim=8, num_vars=5, groups=2)
    x = torch.randn(50, 8, generator=gen(13))
    out = vq(x, generator=gen(14))
    g, v = 2, 5
    probs = out.logits.detach().double().softmax(-1).mean(0)  # (G, V) batch-averaged
    prob_ppl = sum(math.exp(stats.entropy(probs[i].numpy())) for i in range(g))
    usage = F.one_hot(out.codes, v).double().mean(0)
    code_ppl = sum(math.exp(stats.entropy(usage[i].numpy())) for i in range(g))
    assert out.prob_perplexity.item() == pytest.approx(prob_ppl, rel=1e-5)
    assert out.code_perplexity.item() == pytest.approx(code_ppl, rel=1e-5)
    assert out.diversity_loss.item() == pytest.approx((g * v - prob_ppl) / (g * v), rel=1e-5)
    # one code for everything: perplexity 1 per group
    with torch.no_grad():
        vq.weight_proj.weight.zero_()
        vq.weight_proj.bias.copy_(torch.tensor([9.0, 0, 0, 0, 0] * 2) * 10)
    same = vq(x, generator=gen(15))
    assert same.code_perplexity.item() == pytest.approx(2.0)
    assert same.diversity_loss.item() == pytest.approx(0.8, abs=1e-6)
    # the diversity loss has a gradient (it trains the projection)
    vq2 = GumbelVectorQuantizer(dim=8, num_vars=5, groups=2)
    vq2(x, generator=gen(16)).diversity_loss.backward()
    assert vq2.weight_proj.weight.grad.abs().sum() > 0


def test_quantizer_codes_follow_the_categorical():
    # training-mode codes ~ Categorical(softmax(logits)) per group: chi-square p > 1e-3
    vq = GumbelVectorQuantizer(dim=4, num_vars=4, groups=2, tau=2.0)
    x = torch.randn(1, 4, generator=gen(17)).expand(20_000, 4)
    with torch.no_grad():
        out = vq(x, generator=gen(18))
    probs = out.logits[0].double().softmax(-1)
    for g in range(2):
        assert chisquare_p(out.codes[:, g], probs[g]) > 1e-3


def test_quantizer_eval_is_argmax_and_deterministic():
    vq = GumbelVectorQuantizer(dim=6, num_vars=4).eval()
    x = torch.randn(10, 6, generator=gen(19))
    with torch.no_grad():
        a, b = vq(x, generator=gen(1)), vq(x, generator=gen(2))
    assert torch.equal(a.codes, a.logits.argmax(-1)) and torch.equal(a.x, b.x)


def test_quantizer_computes_in_float32_under_bfloat16_autocast():
    vq = GumbelVectorQuantizer(dim=16, num_vars=8, groups=2)
    x = torch.randn(4, 16, generator=gen(20))
    plain = vq(x, generator=gen(21))
    pre = torch.nn.Linear(16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = vq(x, generator=gen(21))
        h = pre(x)  # a bfloat16 activation from an autocast layer
        auto_bf16 = vq(h, generator=gen(21))
    assert h.dtype == torch.bfloat16
    for out in (auto, auto_bf16):
        assert out.logits.dtype == torch.float32
        assert out.prob_perplexity.dtype == out.diversity_loss.dtype == torch.float32
    # float32 input: the very same computation as without autocast
    assert torch.equal(auto.logits, plain.logits) and torch.equal(auto.x, plain.x)
    assert auto_bf16.x.dtype == torch.bfloat16
    # bfloat16 input: projected in float32 from the (upcast) bfloat16 values, not in bfloat16
    expected = F.linear(h.float(), vq.weight_proj.weight, vq.weight_proj.bias).unflatten(-1, (2, 8))
    torch.testing.assert_close(auto_bf16.logits, expected)


def test_quantizer_float64_no_grad_eval():
    vq = GumbelVectorQuantizer(dim=6, num_vars=4, groups=2, vq_dim=4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    out = vq(x, generator=gen())
    assert out.x.dtype == out.logits.dtype == torch.float64
    with torch.no_grad():
        out = vq.eval()(x)
    assert out.x.shape == (3, 4) and not out.x.requires_grad


def test_quantizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="divisible"):
        GumbelVectorQuantizer(dim=8, num_vars=4, groups=3, vq_dim=8)
    with pytest.raises(ValueError, match="num_vars"):
        GumbelVectorQuantizer(dim=8, num_vars=0)
    vq = GumbelVectorQuantizer(dim=8, num_vars=4)
    with pytest.raises(ValueError, match="dim=8"):
        vq(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="tau"):
        vq.tau = -1.0
    vq.tau = 0.5
    assert vq.select.tau == 0.5


# ----------------------------------------------------------------------------- VAE

def tiny_vae(seed=0, n=2, k=3, features=5):
    torch.manual_seed(seed)
    return CategoricalVAE(features, n_latents=n, n_classes=k, hidden=(7,)).double()


def exact_terms(vae, x):
    """log p(x), the ELBO, the KL, and the relative variance of the importance weight
    w = p(x, z) / q(z | x) under q, by enumerating every code (float64)."""
    n, k = vae.n_latents, vae.n_classes
    codes = torch.tensor(list(itertools.product(range(k), repeat=n)))  # (k^n, n)
    z = F.one_hot(codes, k).double()
    log_q = vae.encode(x).log_softmax(-1)  # (B, n, k)
    log_qz = log_q[:, torch.arange(n), codes].sum(-1)  # (B, k^n)
    log_px_z = -vae.nll(x, z.unsqueeze(1).expand(-1, x.shape[0], -1, -1)).T  # (B, k^n)
    log_pz = -n * math.log(k)
    log_px = torch.logsumexp(log_px_z + log_pz, -1)
    kl = (log_qz.exp() * (log_qz - log_pz)).sum(-1)
    elbo = (log_qz.exp() * log_px_z).sum(-1) - kl
    rel_var = torch.logsumexp(2 * (log_px_z + log_pz) - log_qz, -1).sub(2 * log_px).exp() - 1
    return log_px, elbo, kl, rel_var


def test_vae_kl_is_exact():
    vae = tiny_vae()
    x = torch.randint(0, 2, (4, 5), generator=gen(30)).double()
    _, _, kl, _ = exact_terms(vae, x)
    torch.testing.assert_close(vae.kl(vae.encode(x)), kl)
    q = torch.distributions.Categorical(logits=vae.encode(x))
    uniform = torch.distributions.Categorical(logits=torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(vae.kl(vae.encode(x)),
                               torch.distributions.kl_divergence(q, uniform).sum(-1))


def test_vae_importance_bound_against_enumeration():
    vae = tiny_vae(1)
    x = torch.randint(0, 2, (3, 5), generator=gen(31)).double()
    log_px, elbo, _, rel_var = exact_terms(vae, x)
    with torch.no_grad():
        # m = 1: an unbiased ELBO estimate; mean of 20000 draws within 5 standard errors
        draws = torch.stack([vae.importance_bound(x, 1, generator=gen(32 + i)) for i in range(4)])
        many = vae.importance_bound(x.repeat(5000, 1), 1, generator=gen(40)).view(5000, 3)
        est = torch.cat([draws, many])
        se = est.std(0) / math.sqrt(est.shape[0])
        assert bool(((est.mean(0) - elbo).abs() < 5 * se).all())
        # m large: L_m = log p(x) + O(rel_var / m) bias + O(sqrt(rel_var / m)) noise
        m = 20_000
        tight = vae.importance_bound(x, m, generator=gen(41))
    band = rel_var / m + 5 * (rel_var / m).sqrt()
    assert bool(((tight - log_px).abs() < band).all()), (tight - log_px, band)
    assert bool((elbo <= log_px).all())


def test_vae_forward_outputs():
    vae = tiny_vae(2)
    x = torch.randint(0, 2, (6, 5), generator=gen(33)).double()
    hard = vae(x, lambda lg: gk.gumbel_softmax(lg, 0.5, hard=True, generator=gen(34)))
    torch.testing.assert_close(hard.neg_elbo, (hard.nll + hard.kl).detach())
    soft = vae(x, lambda lg: gk.gumbel_softmax(lg, 0.5, generator=gen(34)))
    # the soft run's -ELBO is scored with the discrete codes of the same noise
    torch.testing.assert_close(soft.neg_elbo, hard.neg_elbo)
    assert not torch.equal(soft.nll.detach(), hard.nll.detach())
    (soft.nll + soft.kl).mean().backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_vae_no_grad_eval_float32():
    vae = CategoricalVAE(8, n_latents=3, n_classes=4, hidden=(6, 5)).eval()
    x = torch.randint(0, 2, (2, 8), generator=gen(35)).float()
    with torch.no_grad():
        out = vae(x, lambda lg: F.one_hot(gk.gumbel_max(lg, generator=gen()), 4).float())
        bound = vae.importance_bound(x, 3, generator=gen())
    assert out.nll.dtype == torch.float32 and not out.nll.requires_grad
    assert bool(torch.isfinite(bound).all())


def test_vae_prior_samples_are_uniform_one_hot():
    vae = CategoricalVAE(4, n_latents=2, n_classes=5, hidden=(3,))
    z = vae.sample_prior(10_000, generator=gen(36))
    assert z.shape == (10_000, 2, 5) and bool((z.sum(-1) == 1).all())
    assert chisquare_p(z.argmax(-1), torch.full((5,), 0.2)) > 1e-3


def test_vae_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_classes"):
        CategoricalVAE(4, n_classes=1)
    with pytest.raises(ValueError, match="hidden"):
        CategoricalVAE(4, hidden=(0,))
    with pytest.raises(ValueError, match="importance samples"):
        CategoricalVAE(4).importance_bound(torch.zeros(1, 4), 0)
