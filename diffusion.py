"""
Diffusion for AudioChat-mini: the noise schedule, the Audio Transfusion Forcing loss, the samplers
(DDIM and DPM-Solver++(2M) on a Karras schedule) and classifier-free guidance.

    ┌───────────────────────────── the one convention ─────────────────────────────┐
    │ t in [0, 1] is the noise level: t = 0 is clean data, t = 1 is pure noise.      │
    │ alpha = cos(pi t / 2),  sigma = sin(pi t / 2)        (alpha^2 + sigma^2 = 1)   │
    │ x_t = alpha x0 + sigma eps                           (eps ~ N(0, I))           │
    │ v   = alpha eps - sigma x0                           (what the model predicts) │
    │ x0  = alpha x_t - sigma v,   eps = sigma x_t + alpha v                         │
    │ Clean context (previous audio, text) has t = 0.                                │
    └────────────────────────────────────────────────────────────────────────────────┘

Every sign below follows from this box. v-prediction on the cosine schedule is what the paper
uses (DDPM-style, v target); its sampler is DPM-Solver++ on a Karras schedule with CFG scale 3.

    loss, ce, mse = transfusion_forcing_loss(model, batch, null_id)        # batch: train.collate
    audio = sample_audio(model, cache, n_tokens=100, steps=25, sampler="dpmpp", cfg_scale=3.0)

Read all of it: it is the paper's method (minRF's rf.py is the model to follow).
"""
import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The noise schedule

def alpha_sigma(t):
    """t: tensor of noise levels -> (alpha, sigma) of the same shape (the box above)."""
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

def shift_noise_level(t, shift):
    """Move noise levels towards noise: the level whose signal-to-noise ratio (alpha / sigma)^2
    is shift^2 times smaller, t' = (2 / pi) atan(shift tan(pi t / 2)); shift 1 leaves t alone.
    The "shifted schedule" of simple diffusion (Hoogeboom et al. 2023) and SD3's timestep shift:
    neighbouring frames are alike, so at low levels a span is guessed from itself, not the plan."""
    alpha, sigma = alpha_sigma(t)
    return (2 / math.pi) * torch.atan2(shift * sigma, alpha.clamp(min=0))  # atan2: exact at t = 1

def add_noise(x0, eps, t):
    """x0, eps: (B, L, latent), t: (B, L) -> (x_t, v target), both (B, L, latent)."""
    alpha, sigma = (a[..., None] for a in alpha_sigma(t))
    return alpha * x0 + sigma * eps, alpha * eps - sigma * x0


# -----------------------------------------------------------------------------
# Audio Transfusion Forcing: one noise level per audio span

CONTEXT_T_MAX = 0.1  # a user-supplied span that is not kept clean gets a small t ~ U(0, 0.1)

def rand(shape, generator, device, normal=False):
    """U(0, 1) (or N(0, 1)) numbers drawn on the generator's device, then moved to `device`."""
    gen_device = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=gen_device).to(device)

def sample_noise_levels(span_id, span_is_target, clean_context_p=0.9, shift=1.0, generator=None):
    """Noise level of every token for one training step (the paper's Audio Transfusion Forcing).

    span_id: (B, L) long, span_is_target: (B, S) bool -> t: (B, L) float, 0 at text tokens.
    Every assistant audio span gets its OWN t = shift_noise_level(u, shift), u ~ U(0, 1)
    (diffusion forcing across turns), so the model can neither copy the previous turn nor rely
    on it being clean. A span the user supplies stays clean with probability clean_context_p,
    else gets a small t, so the answer about it stays learnable. Draws come from `generator`
    on its own device: the same numbers on every device.
    """
    B, L = span_id.shape
    S = span_is_target.size(1)
    idx = span_id.clamp(min=0)  # text positions read span 0; torch.where below discards them
    u = rand((B, S), generator, span_id.device).gather(1, idx)
    keep_clean = (rand((B, S), generator, span_id.device) < clean_context_p).gather(1, idx)
    t_context = torch.where(keep_clean, 0.0, CONTEXT_T_MAX * u)
    t = torch.where(span_is_target.gather(1, idx), shift_noise_level(u, shift), t_context)
    return torch.where(span_id >= 0, t, 0.0)

def transfusion_forcing_loss(model, batch, null_id, lambda_audio=5.0, cfg_drop_p=0.1,
                             clean_context_p=0.9, noise_shift=1.0, generator=None, per_token=False):
    """One training loss: loss = CE(text) + lambda_audio * MSE(v), as in Transfusion and AudioChat.

    batch: the dict made by train.collate, on the model's device. Returns (loss, ce, mse), 0-dim.
    - Audio is noised at its span's own t (sample_noise_levels, shifted by noise_shift) and the
      model predicts v in place.
    - With probability cfg_drop_p a whole sample's plain text becomes <|null|> (classifier-free
      guidance learns the unconditional model); that sample's text CE is off, since its answer
      words would have to be predicted from nulls.
    - ce: next-token cross-entropy at text_target positions (assistant words), mean over them.
    - mse: squared v error averaged over the audio tokens of target spans (and latent channels);
      user-supplied spans are conditioning only. A batch with no target span (the text stage)
      has mse 0 and runs the model only up to its text head (model.forward's layers="text").
    per_token=True also returns {"t", "mse", "x0_power"}, each (B, L), and "is_target" (B, L) bool:
    what validation needs to bin the error by noise level (minRF's loss bins).
    """
    tokens, x0, span_id = batch["tokens"], batch["audio"], batch["span_id"]
    t = sample_noise_levels(span_id, batch["span_is_target"], clean_context_p, noise_shift, generator)
    eps = rand(x0.shape, generator, x0.device, normal=True)
    x_t, v_target = add_noise(x0, eps, t)  # text positions: x0 = 0 and t = 0, so x_t = 0

    drop = rand((tokens.size(0),), generator, tokens.device) < cfg_drop_p  # (B,)
    inputs = torch.where(drop[:, None] & batch["is_plain_text"], null_id, tokens)
    is_target = batch["span_is_target"].gather(1, span_id.clamp(min=0)) & (span_id >= 0)  # (B, L)
    has_audio_target = bool(is_target.any())
    text_logits, v_pred = model(inputs, x_t, t, span_id, batch.get("doc_id"),
                                layers="all" if has_audio_target else "text")

    ce_mask = batch["text_target"][:, :-1] & ~drop[:, None]  # position i predicts tokens[i + 1]
    ce_all = F.cross_entropy(text_logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    ce = (ce_all * ce_mask).sum() / ce_mask.sum().clamp(min=1)

    if not has_audio_target:
        mse_all, mse = torch.zeros_like(t), torch.zeros_like(ce)
    else:
        mse_all = (v_pred.float() - v_target).pow(2).mean(-1)
        mse = (mse_all * is_target).sum() / is_target.sum()
    losses = (ce + lambda_audio * mse, ce, mse)
    if per_token:
        return *losses, {"t": t, "mse": mse_all, "x0_power": x0.pow(2).mean(-1), "is_target": is_target}
    return losses


# -----------------------------------------------------------------------------
# Samplers over any denoiser v_fn(x_t, t) -> v, x: (B, N, latent), t: (B,)

def cfg(v_cond, v_uncond, scale):
    """Classifier-free guidance: v_uncond + scale * (v_cond - v_uncond), on every channel.
    scale 1 is the conditional model, 0 the unconditional one, > 1 pushes further towards the
    condition (the paper uses 3). flow_matching's w is scale - 1. v is linear in eps and x0, so
    guiding v guides both."""
    return v_uncond + scale * (v_cond - v_uncond)

def check_steps(steps):
    """A sampler needs at least one denoiser call: 0 steps would return the noise (or zeros)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")

def ddim_sample(v_fn, noise, steps):
    """Deterministic DDIM (eta = 0) from t = 1 to t = 0 in `steps` equal steps of t.

    noise: (B, N, latent) standard normal, the sample at t = 1. Each step predicts x0 and eps from
    v (the box), then re-noises x0 with the same eps at the next, lower t. ValueError if steps < 1.
    """
    check_steps(steps)
    x = noise
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        alpha, sigma = alpha_sigma(t)
        v = v_fn(x, t.expand(x.size(0)))
        x0, eps = alpha * x - sigma * v, sigma * x + alpha * v
        alpha_next, sigma_next = alpha_sigma(t_next)
        x = alpha_next * x0 + sigma_next * eps
    return x

def karras_ts(steps, sigma_min, sigma_max, rho, device=None):
    """Karras et al. (2022) schedule: `steps` noise-to-signal ratios s = sigma / alpha, spaced
    evenly in s^(1/rho) from sigma_max down to sigma_min (denser near the data), then s = 0.
    Mapped to our noise level by t = (2 / pi) atan(s). Returns (steps + 1,) t values."""
    ramp = torch.linspace(0, 1, steps, device=device)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([torch.atan(s) * (2 / math.pi), s.new_zeros(1)])

def dpmpp_2m_sample(v_fn, noise, steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow
    ODE in data prediction, on a Karras schedule; AudioChat's sampler. One v_fn call per step.

    In lambda = log(alpha / sigma), the exact solution is a weighted integral of x0(lambda); the
    solver takes x0 linear in lambda through the last two predictions:
        x_next = (sigma_next / sigma) x - alpha_next (exp(-h) - 1) D,  h = lambda_next - lambda
        D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev,  r = h_prev / h      (D = x0 on the first step)
    The last step lands on t = 0, where the update is x = x0. noise: (B, N, latent) ~ N(0, I).
    sigma_min/sigma_max are the Karras noise-to-signal ratios (EDM defaults); t starts at
    t_max = (2/pi) atan(sigma_max) just below 1, where x is noise scaled by sigma(t_max).
    ValueError if steps < 1.
    """
    check_steps(steps)
    ts = karras_ts(steps, sigma_min, sigma_max, rho, noise.device)
    x = alpha_sigma(ts[0])[1] * noise
    x0_prev = h_prev = None
    for i in range(steps):
        alpha, sigma = alpha_sigma(ts[i])
        v = v_fn(x, ts[i].expand(x.size(0)))
        x0 = alpha * x - sigma * v
        if i == steps - 1:  # the next level is t = 0: the ODE's endpoint is the data prediction
            return x0
        alpha_next, sigma_next = alpha_sigma(ts[i + 1])
        h = torch.log(alpha_next / sigma_next) - torch.log(alpha / sigma)
        D = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        x = (sigma_next / sigma) * x - alpha_next * torch.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x

SAMPLERS = {"ddim": ddim_sample, "dpmpp": dpmpp_2m_sample}

def check_sampling(sampler, steps):
    """ValueError for a sampler not in SAMPLERS or steps < 1 (for callers that check before they start)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use {' or '.join(SAMPLERS)}")
    check_steps(steps)


# -----------------------------------------------------------------------------
# Sampling one audio span with the model and its prefix cache

@torch.no_grad()
def sample_audio(model, cache, n_tokens, steps=50, sampler="dpmpp", cfg_scale=3.0, generator=None):
    """Generate one audio span after the cached prefix (which ends with <|audio|>); commit it.

    cache: the model's KVCache holding the prefix in B conditional rows, then (cfg_scale != 1) in B
    rows with its plain text replaced by <|null|>, so that both branches run in ONE forward per step
    (batched CFG). Each of the `steps` denoiser calls runs only the n_tokens new audio tokens against
    the cached prefix (nothing before the span attends to it, so its keys and values never change).
    Returns x0: (B, n_tokens, latent) and leaves the clean span (t = 0) committed in every row,
    ready for the next text turn. ValueError for steps < 1, an unknown sampler, or odd rows with CFG.
    """
    check_sampling(sampler, steps)
    guided = cfg_scale != 1.0
    rows = cache.batch_size
    if guided and rows % 2:
        raise ValueError(f"cfg_scale {cfg_scale} needs conditional and unconditional rows, got {rows} rows")
    B = rows // 2 if guided else rows
    dev = model.wte.weight.device
    # the token ids of audio positions are never read (the audio embedding replaces them)
    tokens = torch.zeros(rows, n_tokens, dtype=torch.long, device=dev)
    span_id = torch.zeros(rows, n_tokens, dtype=torch.long, device=dev)  # one span: all see each other

    def v_fn(x, t):
        x_rows = torch.cat([x, x]) if guided else x
        t_rows = t.repeat(rows // B)[:, None].expand(rows, n_tokens)
        _, v = model.extend(cache, tokens, x_rows, t_rows, span_id, layers="all", commit=False)
        v = v.float()
        return cfg(v[:B], v[B:], cfg_scale) if guided else v

    noise = rand((B, n_tokens, model.config.latent_dim), generator, dev, normal=True)
    x0 = SAMPLERS[sampler](v_fn, noise, steps)
    clean = torch.cat([x0, x0]) if guided else x0
    model.extend(cache, tokens, clean, torch.zeros(rows, n_tokens, device=dev), span_id, layers="all", commit=True)
    return x0
