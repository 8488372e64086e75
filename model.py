"""
The AudioChat-mini model: one transformer that reads and writes text tokens and audio patches.

It is the paper's Self-Cascaded Transformer (SCT, AudioChat section 3.2) at toy scale:

    tokens ──► embedding ──► U understanding layers ──► text head  (next text token)
     (text ids, or noisy                │
      audio patches + their              └──► G generation layers ──► diffusion head  (v of each
      noise level)                                                         audio patch, in place)

Every token passes all U + G layers in training. The text head reads layer U, so decoding text
needs only the U understanding layers; the diffusion head reads layer U + G and predicts, at each
audio position, the velocity v of that same patch (see diffusion.py for the convention).
The ablation variants (the paper's Table 4): `dense`, one shared stack of U + G layers with both
heads on top; `mot`, a mixture of transformers: the same stack, but every layer keeps one copy of
its weights for text tokens and one for audio tokens, and attention is shared over both.

Attention follows Transfusion: causal everywhere, plus full bidirectional attention inside each
audio span. The rule is written once (`mask_rule`) and served by three interchangeable backends
(`attend`): `math` to read, `sdpa` and `flex` for speed. Positions are rotary (RoPE): attention sees
how far back a token is, wherever the turn sits in the dialogue. Decoding uses one key/value cache
for both text and audio (`new_cache`, `extend`).

    model = AudioChatModel(ModelConfig(vocab_size=1024))
    text_logits, v_pred = model(tokens, audio, t, span_id)      # training: the whole sequence

Read line by line: mask_rule, attend's math backend, the blocks, embed, forward, extend. Skim:
document_split and the flex plumbing (speed), KVCache's bookkeeping, configure_optimizers.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# -----------------------------------------------------------------------------
# The Transfusion attention mask: one rule, three backends

def mask_rule(q_pos, kv_pos, q_span, kv_span, q_doc=None, kv_doc=None):
    """May the query at q_pos attend to the key at kv_pos? Arguments broadcast against each other.

    Causal OR (both in the same audio span): text (span -1) is causal, an audio span sees all of
    itself (a patch is denoised together with its neighbours, before and after), and different
    spans stay causal to each other. With packed sequences (doc ids given) nothing crosses a
    document boundary. The causal diagonal is always allowed, so no row is fully masked.
    """
    allowed = (q_pos >= kv_pos) | ((q_span == kv_span) & (q_span >= 0))
    if q_doc is not None:
        allowed = allowed & (q_doc == kv_doc)
    return allowed

def transfusion_mask(span_id, doc_id=None):
    """span_id: (B, L) long, -1 for text and 0, 1, ... per audio span; doc_id: (B, L) or None.
    Returns (B, L, L) bool, True where query i may attend to key j."""
    pos = torch.arange(span_id.size(1), device=span_id.device)
    q_doc, kv_doc = (None, None) if doc_id is None else (doc_id[:, :, None], doc_id[:, None, :])
    return mask_rule(pos[:, None], pos[None, :], span_id[:, :, None], span_id[:, None, :], q_doc, kv_doc)

def flex_block_mask(span_id, doc_id=None):
    """The same rule as a FlexAttention BlockMask: blocks of 128 x 128 that are fully masked
    (a text query block far before an audio span, another document) are never computed."""
    def mask_mod(b, h, q, kv):
        q_doc, kv_doc = (None, None) if doc_id is None else (doc_id[b, q], doc_id[b, kv])
        return mask_rule(q, kv, span_id[b, q], span_id[b, kv], q_doc, kv_doc)
    B, L = span_id.shape
    return create_block_mask(mask_mod, B, None, L, L, device=span_id.device)

def document_positions(doc_id):
    """doc_id: (B, L) of packed rows (each document one run of the same id) -> (B, L) long, each
    token's position inside its own document: every document starts at 0, as it will when sampled."""
    pos = torch.arange(doc_id.size(1), device=doc_id.device).expand_as(doc_id)
    starts = torch.ones_like(doc_id, dtype=torch.bool)
    starts[:, 1:] = doc_id[:, 1:] != doc_id[:, :-1]
    return pos - torch.where(starts, pos, 0).cummax(dim=1).values

def document_split(span_id, doc_id):
    """The Transfusion mask for packed rows, one document at a time: nothing crosses a document
    boundary, so attention over a row of k documents is k attentions of one document each, and a
    dense kernel (sdpa) skips the cross-document blocks it would otherwise compute and mask.
    span_id, doc_id: (B, L) -> (index (n_docs, Lmax) long: each document's positions in the
    flattened (B * L) row, B * L where it is padded; mask (n_docs, Lmax, Lmax) bool). Each document is
    one run of its id, padding (-1) at the row's end. No loop over documents: on a GPU every step of
    one would wait for the device."""
    B, L = span_id.shape
    real = doc_id >= 0
    n_docs = doc_id.max(dim=1).values + 1                   # (B,) documents in each row
    doc = (n_docs.cumsum(0) - n_docs)[:, None] + doc_id     # (B, L) each token's document, counted over the batch
    pos = document_positions(doc_id)[real]
    index = torch.full((int(n_docs.sum()), int(pos.max()) + 1), B * L, dtype=torch.long, device=span_id.device)
    index[doc[real], pos] = torch.arange(B * L, device=span_id.device).view(B, L)[real]
    spans = torch.cat([span_id.reshape(-1), span_id.new_full((1,), -1)])[index]   # padding: text
    return index, transfusion_mask(spans)   # padding rows keep their causal diagonal: never NaN

@functools.cache
def compiled_flex_attention():
    """torch.compile turns flex_attention into one fused kernel (built on the first CUDA call).
    Elsewhere flex runs eagerly, and forward only: PyTorch has no flex backward on CPU or MPS."""
    return torch.compile(flex_attention)

def attend(q, k, v, mask, backend):
    """Scaled dot-product attention with the Transfusion mask.

    q: (B, H, Lq, hd), k, v: (B, H, Lk, hd). mask: (B, Lq, Lk) bool for `math` and `sdpa`, or for
    `sdpa` on packed rows the (index, mask) of document_split; a BlockMask for `flex`. Returns
    (B, H, Lq, hd). The three backends agree to float tolerance (padding excepted: its outputs
    are zero in a document split, and nothing reads them).
    """
    if backend == "math":  # what the fused kernels compute, written out
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        att = att.masked_fill(~mask[:, None], float("-inf"))
        return F.softmax(att, dim=-1) @ v
    if backend == "sdpa" and isinstance(mask, tuple):   # packed rows (document_split)
        index, doc_mask = mask
        B, H, L, hd = q.shape

        def per_document(z):   # (B, H, L, hd) -> (n_docs, H, Lmax, hd), a zero row for padding
            flat = torch.cat([z.transpose(1, 2).reshape(B * L, H, hd), z.new_zeros(1, H, hd)])
            return flat[index].transpose(1, 2)
        y = F.scaled_dot_product_attention(per_document(q), per_document(k), per_document(v), attn_mask=doc_mask[:, None])
        real = index < B * L
        out = q.new_zeros(B * L, H, hd).index_put((index[real],), y.transpose(1, 2)[real])
        return out.view(B, L, H, hd).transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    if backend == "flex":
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask)
    raise ValueError(f"unknown attention backend {backend!r}: use math, sdpa or flex")


# -----------------------------------------------------------------------------
# Rotary positions (RoPE, Su et al. 2021)

def rotary(pos, head_dim):
    """pos: (B, L) or (L,) token positions -> (cos, sin), each (B, 1, L, hd/2) or (L, hd/2), the
    angles pos * 10000^(-2i/hd) of channel pair i, ready to broadcast over (B, H, L, hd/2)."""
    freqs = 10000.0 ** (-torch.arange(0, head_dim // 2, device=pos.device, dtype=torch.float32) * 2 / head_dim)
    angles = pos.float()[..., None] * freqs
    if angles.dim() == 3:
        angles = angles[:, None]
    return angles.cos(), angles.sin()

def rotate(x, rope):
    """x: (B, H, L, hd) queries or keys, each channel pair (i, i + hd/2) turned by its angle. Then
    q_m . k_n depends on the positions m, n only through m - n: attention sees how far back a
    token is, not where the dialogue put it."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# -----------------------------------------------------------------------------
# Transformer blocks (nanoGPT, pre-norm)

class PerModality(nn.Module):
    """MoT: two copies of a layer, `text` and `audio`; x: (B, L, D), is_audio: (B, L) bool -> each
    token through its own modality's copy, (B, L, D_out)."""

    def __init__(self, make):
        super().__init__()
        self.text, self.audio = make(), make()

    def forward(self, x, is_audio):
        y_text, y_audio = self.text(x[~is_audio]), self.audio(x[is_audio])
        y = y_text.new_empty(*x.shape[:-1], y_text.size(-1))
        y[~is_audio], y[is_audio] = y_text, y_audio
        return y

def layer(config, make):
    """A layer of a block: one shared copy, or (arch mot) a PerModality pair."""
    return PerModality(make) if config.arch == "mot" else make()

def through(layer, x, is_audio):
    return layer(x, is_audio) if isinstance(layer, PerModality) else layer(x)

class SelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = layer(config, lambda: nn.Linear(config.n_embd, 3 * config.n_embd, bias=False))  # q, k, v at once
        self.c_proj = layer(config, lambda: nn.Linear(config.n_embd, config.n_embd, bias=False))
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, backend, rope, is_audio, past_kv=None):
        """x: (B, L, D) -> (B, L, D), and the keys and values it attended to, each (B, H, T + L, hd):
        past_kv, the cached (k, v) of T earlier tokens (or None), followed by this chunk's.
        rope: the chunk's (cos, sin) from `rotary`; cached keys are stored already turned.
        is_audio: (B, L) bool, which projections a token goes through (arch mot)."""
        B, L, D = x.shape
        q, k, v = through(self.c_attn, x, is_audio).split(D, dim=2)
        q, k, v = (z.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for z in (q, k, v))
        q, k = rotate(q, rope), rotate(k, rope)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)
        y = attend(q, k, v, mask, backend)
        y = y.transpose(1, 2).contiguous().view(B, L, D)
        return self.resid_dropout(through(self.c_proj, y, is_audio)), (k, v)

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))

class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = layer(config, lambda: nn.LayerNorm(config.n_embd, bias=False))
        self.attn = SelfAttention(config)
        self.ln_2 = layer(config, lambda: nn.LayerNorm(config.n_embd, bias=False))
        self.mlp = layer(config, lambda: MLP(config))

    def forward(self, x, mask, backend, rope, is_audio, past_kv=None):
        """x: (B, L, D), is_audio: (B, L) bool -> (B, L, D), and the (k, v) of the cache plus the chunk."""
        a, kv = self.attn(through(self.ln_1, x, is_audio), mask, backend, rope, is_audio, past_kv)
        x = x + a
        x = x + through(self.mlp, through(self.ln_2, x, is_audio), is_audio)
        return x, kv


# -----------------------------------------------------------------------------
# An audio token: its embedding (noise level, time in its span) and its diffusion head

class ScalarEmbedding(nn.Module):
    """x: (...) a number in [0, 1] -> (..., D). Sinusoidal features, then an MLP (DiT's
    TimestepEmbedder). Two of them embed an audio token: its span's noise level t (every audio
    token carries its own span's t: diffusion forcing) and its place in its span (span_positions)."""

    def __init__(self, n_embd, n_freq=128):
        super().__init__()
        # frequencies from 1 to 1000 cycles over [0, 1]: fine enough to tell t = 0 from t = 0.01
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), n_freq // 2)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(n_freq, n_embd), nn.SiLU(), nn.Linear(n_embd, n_embd))

    def forward(self, x):
        angles = x[..., None].float() * self.freqs * 2 * math.pi
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))

def span_positions(span_id):
    """span_id: (B, L) -> (B, L) long: the index of each audio token inside its span (0, 1, ...:
    the patch's time in the clip, in patches), 0 for text. Spans are contiguous runs of one id,
    and a chunk given to the model holds whole spans, so the chunk alone tells where each begins."""
    idx = torch.arange(span_id.size(1), device=span_id.device).expand_as(span_id)
    before = torch.cat([span_id.new_full(span_id[:, :1].shape, -1), span_id[:, :-1]], dim=1)
    begins = (span_id >= 0) & (span_id != before)
    first = torch.where(begins, idx, 0).cummax(dim=1).values
    return torch.where(span_id >= 0, idx - first, 0)

class DiffusionHead(nn.Module):
    """h: (B, L, D) the state at layer U + G, x_t: (B, L, latent) the noisy patches, c: (B, L, D)
    their noise-level embedding -> v: (B, L, latent), the velocity of each patch.

    A one-block MLP per token that also sees the noisy patch it denoises (MAR's denoising MLP,
    reduced): the transformer says what the patch should hold, the head weighs that against x_t
    (with a bare linear read-out the noisy patch would have to be carried through every layer)."""

    def __init__(self, config):
        super().__init__()
        self.ln_h = nn.LayerNorm(config.n_embd, bias=False)
        self.patch_in = nn.Linear(config.latent_dim, config.n_embd, bias=False)
        self.ln_mlp = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)
        self.ln_out = nn.LayerNorm(config.n_embd, bias=False)
        self.out = nn.Linear(config.n_embd, config.latent_dim, bias=False)

    def forward(self, h, x_t, c):
        y = self.ln_h(h) + self.patch_in(x_t) + c
        y = y + self.mlp(self.ln_mlp(y))
        return self.out(self.ln_out(y))


# -----------------------------------------------------------------------------
# The key/value cache used for decoding

class KVCache:
    """Keys and values of every committed token, per layer: kv[i] = (k, v), each (B, H, T_i, hd).

    SCT decodes text through the U understanding layers only, so the G generation layers can lag
    behind: `pending` (B, P, D) holds the layer-U hidden states of the P tokens they have not seen
    yet, and `pending_span` (B, P) their span ids. They are run through the generation layers, as
    one chunk, when an audio span next needs those layers. All rows of a batch share one length.
    """

    def __init__(self, n_layer, batch_size):
        self.batch_size = batch_size
        self.kv = [None] * n_layer   # None until a chunk reaches layer i
        self.pending = self.pending_span = None
        self.last = None  # (B, D) the last committed token's input embedding (for token shift)

    def __len__(self):
        """Number of committed tokens (all of them are in the understanding layers)."""
        return 0 if self.kv[0] is None else self.kv[0][0].size(2)

    def add_pending(self, h, span_id):
        """h: (B, n, D) layer-U states of a committed chunk, span_id: (B, n)."""
        if self.pending is not None:
            # the pending tokens are run later as ONE chunk, where equal span ids attend both ways:
            # shift this chunk's span ids past the pending ones so that separate spans stay separate
            span_id = torch.where(span_id >= 0, span_id + self.pending_span.max().clamp(min=-1) + 1, span_id)
            h, span_id = torch.cat([self.pending, h], 1), torch.cat([self.pending_span, span_id], 1)
        self.pending, self.pending_span = h, span_id


# -----------------------------------------------------------------------------
# The model

ARCHS = ("sct", "dense", "mot")                   # text head at layer U, or on top of shared / per-modality layers
ATTN_BACKENDS = ("auto", "math", "sdpa", "flex")  # auto: flex on CUDA, sdpa elsewhere

@dataclass
class ModelConfig:
    vocab_size: int
    latent_dim: int = 128     # floats per audio token (tokenizer.LATENT_DIM)
    n_layer: int = 6          # U understanding layers (the text head reads layer U)
    n_gen_layer: int = 3      # G generation layers on top (the paper: G = U / 2); dense and mot share all U + G
    n_head: int = 4
    n_embd: int = 192
    block_size: int = 2048    # longest sequence
    dropout: float = 0.0      # on embeddings and residual branches (never on attention weights, so backends agree)
    arch: str = "sct"         # "sct": text head at layer U | "dense", "mot": both heads on top of U + G layers
    attn: str = "auto"        # "auto" (flex on CUDA, sdpa elsewhere) | "math" | "sdpa" | "flex"
    token_shift: bool = True  # add a learned map of the previous token's embedding to each input (see embed)
    cot: bool = True          # audio turns write tool calls and read the plan first (False: the paper's "no CoT")

    def __post_init__(self):
        """Refuse a shape that cannot work, naming the flags (ValueError), before anything is built."""
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: use {' or '.join(ARCHS)}")
        if self.attn not in ATTN_BACKENDS:
            raise ValueError(f"unknown attn {self.attn!r}: use {', '.join(ATTN_BACKENDS)}")
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size, self.latent_dim) < 1 \
                or self.n_gen_layer < 0:
            raise ValueError("n_layer, n_head, n_embd, block_size must be >= 1 and n_gen_layer >= 0")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: heads share one width")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} / n_head={self.n_head} gives heads of odd width "
                             f"{self.n_embd // self.n_head}: rotary positions turn channel pairs, so it must be even")

class AudioChatModel(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        n_blocks = config.n_layer + config.n_gen_layer
        # SCT and dense have the same layers and differ only in where the text head reads; mot is dense
        # with a copy of every layer's weights per modality
        self.text_layer = config.n_layer if config.arch == "sct" else n_blocks
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.audio_in = nn.Linear(config.latent_dim, config.n_embd, bias=False)
        self.noise_emb = ScalarEmbedding(config.n_embd)
        self.span_time_emb = ScalarEmbedding(config.n_embd)
        self.shift = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.token_shift else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(n_blocks)])
        self.ln_text = nn.LayerNorm(config.n_embd, bias=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        self.diffusion_head = DiffusionHead(config)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if ".c_proj." in name:   # MoT: attn.c_proj.text.weight and .audio.weight too
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_blocks))
        nn.init.zeros_(self.diffusion_head.out.weight)  # predict v = 0 at first: a calm start for the MSE
        if self.shift is not None:
            nn.init.zeros_(self.shift.weight)  # start as the plain transformer

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def backend(self):
        if self.config.attn != "auto":
            return self.config.attn
        return "flex" if self.wte.weight.is_cuda else "sdpa"

    def embed(self, tokens, audio, t, span_id, prev=None, starts=None):
        """tokens, audio, t, span_id: (B, L, ...) as in forward; prev: (B, D) the embedding of the token
        before this chunk (None: nothing); starts: (B, L) bool, True where a packed document begins
        -> (inputs (B, L, D), the last token's embedding (B, D)).

        A text token is its embedding. An audio token is its projected patch rescaled to the text
        embeddings' mean norm (the paper: otherwise the model learns to ignore audio), plus the
        embeddings of its noise level and of its time in its span (not in the paper: where in its
        clip the patch sits, which rotary positions do not say). Token shift (RWKV's, not the
        paper's): each input also gets a learned map of the previous token's embedding, so one
        layer can copy "the token after the one just written" without a two-layer induction circuit.
        """
        text = self.wte(tokens)
        text_norm = self.wte.weight.norm(dim=1).mean().detach()  # a target scale, not a gradient path
        patch = F.normalize(self.audio_in(audio), dim=-1) * text_norm
        # the conditions are added after the rescaling, at their own learned scale: inside it, a
        # pure-noise patch would drown them, and the model could not tell t = 1 from t = 0.5
        time_in_span = span_positions(span_id) / self.config.block_size
        audio = patch + self.noise_emb(t) + self.span_time_emb(time_in_span)
        e = torch.where((span_id >= 0)[..., None], audio, text)
        x = e
        if self.shift is not None:
            before = torch.zeros_like(e[:, :1]) if prev is None else prev[:, None]
            shifted = torch.cat([before, e[:, :-1]], dim=1)
            if starts is not None:  # a packed document does not see the one before it
                shifted = shifted.masked_fill(starts[..., None], 0.0)
            x = x + self.shift(shifted)
        return self.drop(x), e[:, -1]

    def rope(self, pos):
        """pos: (B, L) or (L,) -> the blocks' rotary (cos, sin)."""
        return rotary(pos, self.config.n_embd // self.config.n_head)

    def text_head(self, h):
        return self.lm_head(self.ln_text(h))

    def audio_head(self, h, audio, t):
        return self.diffusion_head(h, audio, self.noise_emb(t))

    def forward(self, tokens, audio, t, span_id, doc_id=None, layers="all"):
        """The whole sequence at once (training).

        tokens: (B, L) long text ids (anything at audio positions), audio: (B, L, latent) noisy
        latents (anything at text positions), t: (B, L) noise level per token (0 for text),
        span_id: (B, L) -1 for text, 0, 1, ... per audio span, doc_id: (B, L) document of each
        token when several dialogues are packed in one row (positions restart at each document).
        Returns text_logits (B, L, V) from layer U and v_pred (B, L, latent) from layer U + G;
        layers="text" stops at the text head (SCT: U layers, v_pred None), for a batch with no
        audio to learn. ValueError for a sequence longer than block_size.
        """
        if layers not in ("text", "all"):
            raise ValueError(f"layers must be 'text' or 'all', not {layers!r}")
        B, L = tokens.shape
        if L > self.config.block_size:
            raise ValueError(f"sequence of {L} tokens is longer than block_size {self.config.block_size}")
        pos, starts = torch.arange(L, device=tokens.device).expand(B, L), None
        if doc_id is not None:
            pos = document_positions(doc_id)
            starts = pos == 0   # token shift must not carry over from the document before
        backend = self.backend
        if backend == "flex":
            mask = flex_block_mask(span_id, doc_id)
        elif backend == "sdpa" and doc_id is not None:
            mask = document_split(span_id, doc_id)
        else:
            mask = transfusion_mask(span_id, doc_id)
        x, _ = self.embed(tokens, audio, t, span_id, starts=starts)
        rope, is_audio = self.rope(pos), span_id >= 0
        for block in self.blocks[:self.text_layer]:
            x, _ = block(x, mask, backend, rope, is_audio)
        text_logits = self.text_head(x)
        if layers == "text":
            return text_logits, None
        for block in self.blocks[self.text_layer:]:
            x, _ = block(x, mask, backend, rope, is_audio)
        return text_logits, self.audio_head(x, audio, t)

    # ---- decoding with the key/value cache ----

    def new_cache(self, batch_size):
        return KVCache(len(self.blocks), batch_size)

    def _run_chunk(self, cache, x, span_id, blocks, commit):
        """Run x: (B, n, D) through self.blocks[blocks] as one chunk that sees every cached token of
        each layer, and itself through the Transfusion rule. Commits the chunk's K/V if asked."""
        B, n, _ = x.shape
        within = transfusion_mask(span_id)  # (B, n, n)
        backend = "math" if self.backend == "math" else "sdpa"  # see extend() for why not flex
        for i in blocks:
            past = cache.kv[i]
            seen = past[0].size(2) if past is not None else 0   # this layer's cache: the chunk's first position
            mask = torch.cat([within.new_ones(B, n, seen), within], dim=2)
            x, kv = self.blocks[i](x, mask, backend, self.rope(torch.arange(seen, seen + n, device=x.device)), span_id >= 0, past)
            if commit:  # kv already holds the cached keys and values followed by the chunk's
                cache.kv[i] = kv
        return x

    def extend(self, cache, tokens, audio, t, span_id, layers="all", commit=True):
        """Run a chunk of n new tokens after everything in the cache; its outputs equal a full forward's.

        tokens, audio, t, span_id: as in forward, with L = n. The chunk sees every committed token
        and, inside itself, follows the Transfusion rule (an audio span must be given whole, in one
        chunk). layers="text": only the layers the text head needs (SCT: the U understanding
        layers), returns (text_logits (B, n, V), None). layers="all": every layer, returns
        (text_logits, v_pred (B, n, latent)). commit=False leaves the cache as it was (a diffusion
        step on the span being sampled); commit=True appends the chunk. Chunks use `sdpa` (or
        `math`), never flex: their mask is almost dense, and compiled flex would recompile for
        every cache length. ValueError for a chunk that does not fit the cache or block_size.
        """
        B, n = tokens.shape
        if B != cache.batch_size:
            raise ValueError(f"chunk has batch size {B}, the cache was made for {cache.batch_size}")
        if layers not in ("text", "all"):
            raise ValueError(f"layers must be 'text' or 'all', not {layers!r}")
        T = len(cache)
        if T + n > self.config.block_size:
            raise ValueError(f"{T} cached + {n} new tokens exceed block_size {self.config.block_size}")
        U, n_blocks = self.text_layer, len(self.blocks)
        if layers == "all" and cache.pending is not None:
            # the generation layers catch up on the tokens decoded through layer U only
            self._run_chunk(cache, cache.pending, cache.pending_span, range(U, n_blocks), commit=True)
            cache.pending = cache.pending_span = None
        x, last = self.embed(tokens, audio, t, span_id, prev=cache.last)
        if commit:
            cache.last = last
        x = self._run_chunk(cache, x, span_id, range(U), commit)
        text_logits = self.text_head(x)
        if U == n_blocks:  # dense: the text head already needed every layer
            return text_logits, (self.audio_head(x, audio, t) if layers == "all" else None)
        if layers == "text":
            if commit:
                cache.add_pending(x, span_id)
            return text_logits, None
        x = self._run_chunk(cache, x, span_id, range(U, n_blocks), commit)
        return text_logits, self.audio_head(x, audio, t)

    # ---- training helpers ----

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on 2-D weights only (matrices, embeddings), not on norms and biases."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=(device_type == "cuda"))
