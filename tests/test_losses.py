"""Stage-3 losses against closed forms and a literal transcription of the reference formula."""

import math

import torch
import torch.nn.functional as F

from egoslots.pipeline.losses import loss_featrec, loss_slot_slot_contrast, loss_steve_ce

TAU = 0.1


def _orthonormal(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q[:n]  # (n, d) orthonormal rows


def _reference_loss(slots, tau, batch_contrast=True):
    """L = -1/((T-1) B K) sum_t sum_j log(exp(l_t[j, j]) / sum_i exp(l_t[i, j])), with loops."""
    s = F.normalize(slots.double(), dim=-1)
    B, T, K, D = s.shape
    groups = [s.transpose(0, 1).reshape(T, B * K, D)] if batch_contrast else list(s)
    total, count = 0.0, 0
    for g in groups:  # (T, S, D)
        S = g.shape[1]
        for t in range(T - 1):
            for j in range(S):
                logits = [float(g[t, i] @ g[t + 1, j]) / tau for i in range(S)]
                total -= logits[j] - math.log(sum(math.exp(x) for x in logits))
                count += 1
    return total / count


def test_contrast_closed_form_with_batch_contrast():
    B, T, K, D = 2, 3, 3, 8  # B*K <= D
    s = _orthonormal(B * K, D).view(B, 1, K, D).expand(B, T, K, D)
    expected = math.log(1 + (B * K - 1) * math.exp(-1 / TAU))
    loss = loss_slot_slot_contrast(s, TAU, batch_contrast=True)
    assert math.isclose(float(loss), expected, rel_tol=1e-4, abs_tol=1e-7)


def test_contrast_closed_form_without_batch_contrast():
    B, T, K, D = 3, 4, 4, 4
    # every video uses the same orthonormal slots: only in-video negatives count
    s = _orthonormal(K, D).view(1, 1, K, D).expand(B, T, K, D)
    expected = math.log(1 + (K - 1) * math.exp(-1 / TAU))
    loss = loss_slot_slot_contrast(s, TAU, batch_contrast=False)
    assert math.isclose(float(loss), expected, rel_tol=1e-4, abs_tol=1e-7)
    # with batch contrast the identical slots of other videos are hard negatives
    assert float(loss_slot_slot_contrast(s, TAU, batch_contrast=True)) > 1.0


def test_contrast_matches_reference_formula_on_random_slots():
    torch.manual_seed(0)
    slots = torch.randn(2, 3, 4, 5) * 3
    for batch_contrast in (True, False):
        for tau in (0.1, 0.5):
            got = float(loss_slot_slot_contrast(slots, tau, batch_contrast))
            assert math.isclose(got, _reference_loss(slots, tau, batch_contrast), rel_tol=1e-5)


def test_contrast_is_lower_for_temporally_consistent_slots():
    torch.manual_seed(0)
    B, T, K, D = 4, 4, 5, 16
    base = torch.randn(B, 1, K, D)
    consistent = base + 0.1 * torch.randn(B, T, K, D)
    shuffled = torch.stack([consistent[:, t, torch.randperm(K)] for t in range(T)], dim=1)
    assert loss_slot_slot_contrast(consistent, TAU) < loss_slot_slot_contrast(shuffled, TAU) - 1.0


def test_contrast_gather_hook_pools_the_global_batch_with_gradients():
    torch.manual_seed(0)
    local = torch.randn(2, 3, 4, 8, requires_grad=True)
    remote = torch.randn(3, 3, 4, 8)
    gathered = loss_slot_slot_contrast(local, TAU, gather=lambda s: torch.cat([s, remote]))
    direct = loss_slot_slot_contrast(torch.cat([local, remote]), TAU)
    torch.testing.assert_close(gathered, direct)
    gathered.backward()
    assert local.grad is not None and local.grad.abs().sum() > 0


def test_contrast_single_frame_is_zero_and_differentiable():
    slots = torch.randn(2, 1, 3, 8, requires_grad=True)
    loss = loss_slot_slot_contrast(slots, TAU)
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_contrast_is_float32_under_bf16_inputs():
    slots = torch.randn(2, 3, 4, 8).bfloat16()
    assert loss_slot_slot_contrast(slots, TAU).dtype == torch.float32


def test_featrec_is_mse_and_does_not_train_the_target():
    recon = torch.randn(2, 3, 5, 6, requires_grad=True)
    feats = torch.randn(2, 3, 5, 6, requires_grad=True)
    loss = loss_featrec(recon, feats)
    torch.testing.assert_close(loss, ((recon - feats) ** 2).mean())
    loss.backward()
    assert feats.grad is None and recon.grad is not None


def test_steve_ce_is_mean_next_token_cross_entropy():
    torch.manual_seed(0)
    B, T, h, w, V = 2, 3, 2, 2, 7
    logits = torch.randn(B, T, h * w, V)
    tokens = torch.randint(0, V, (B, T, h, w))
    manual = -logits.log_softmax(-1).gather(-1, tokens.view(B, T, h * w, 1)).mean()
    torch.testing.assert_close(loss_steve_ce(logits, tokens), manual)
    # uniform logits give log(V)
    assert math.isclose(
        float(loss_steve_ce(torch.zeros(B, T, 4, V), tokens)), math.log(V), rel_tol=1e-6
    )
