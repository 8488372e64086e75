"""
The two tokenizers of AudioChat-mini, and the chat template that interleaves them.

1. `BPETokenizer`: byte-level BPE for the text (minbpe style). Ids 0..255 are raw bytes, then one
   id per learned merge, then the special tokens of SPECIAL_TOKENS (roles, turn end, audio span
   start/end, the null token for classifier-free guidance, padding).
2. `AudioCodec`: stereo waveform <-> normalised log-mel frames at 40 Hz (the paper's latent rate),
   grouped into patches of PATCH frames, one model token per patch. It is fixed, not learned, so
   nothing has to be trained before the model.
3. `encode_dialogue`: one dialogue (text + audio, chat order) -> one token sequence with the
   per-token fields the model and the loss read.

    from tokenizer import BPETokenizer, AudioCodec, encode_dialogue
    tok = BPETokenizer(); tok.train(texts, vocab_size=1024); tok.save("data/tokenizer.json")
    codec = AudioCodec(); codec.fit([codec.encode_raw(w) for w in wavs])   # (2, N) -> (T, 64)
    seq = encode_dialogue(dialogue, [codec.encode(w) for w in audios], tok)
Read line by line: the BPE (`merge`, `train`, `encode`, `decode`), `AudioCodec.encode_raw` /
`decode_raw` / `patchify`, and `encode_dialogue`. Skim: Griffin-Lim, the NNLS refinement and persistence.
"""
import json
import math
import re
from collections import Counter

import numpy as np
import torch

from world import SR   # Hz, the audio format of the whole project (the toy world's)

# -----------------------------------------------------------------------------
# constants (owned here, SR aside; every other file imports them: this file imports only SR from world.py)

FRAME_RATE = 40               # frames per second: the paper's VAE latent rate
HOP = SR // FRAME_RATE        # 400 samples between frames
N_FFT = 1024                  # STFT window: 64 ms, long enough to resolve a voice's harmonics
N_MELS = 32                   # mel bands per channel
PATCH = 2                     # frames per model token
LATENT_DIM = PATCH * 2 * N_MELS  # 128 floats per audio token (2 frames x (L mels ++ R mels))
MAX_LOG_MEL = math.log(N_FFT ** 2)  # no full-scale signal has more mel power: the decoder clamps here
CODEC_FORMAT = {"sr": SR, "frame_rate": FRAME_RATE, "n_fft": N_FFT, "n_mels": N_MELS, "patch": PATCH}
SPECIAL_TOKENS = ["<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|audio|>", "<|/audio|>", "<|null|>", "<|pad|>"]

# -----------------------------------------------------------------------------
# Part 1: byte-level BPE
#
# Text is first cut into chunks by a regex so that merges never cross a chunk boundary; BPE then
# repeatedly merges the most frequent adjacent pair of ids inside the chunks. As GPT-2, a chunk is
# a word with its leading space, a number (one decimal), or a run of punctuation: a word is then the
# same tokens wherever it stands (` friend` in `says "hello my friend".` and in
# `speak(ben, "hello my friend")`), which is what lets the model copy a request's words into its
# tool calls. The pattern covers every string, so encoding round-trips exactly.
SPLIT_PATTERN = r""" ?[A-Za-z_]+| ?[0-9]+(?:\.[0-9])?| ?[^\sA-Za-z0-9_]+|\s+(?!\S)|\s+"""

def merge(ids, pair, idx):
    """Replace every occurrence of `pair` in the list `ids` by the new id `idx`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

class BPETokenizer:
    """Byte-level BPE: ids 0..255 are bytes, 256.. are merges in the order learned, then the
    special tokens (so `vocab_size` = 256 + len(merges) + len(SPECIAL_TOKENS))."""

    def __init__(self):
        self.merges = {}   # (id, id) -> new id, in the order learned
        self.pattern = re.compile(SPLIT_PATTERN)
        self._build()

    def _build(self):
        """Derive the byte strings of every id (special tokens too), the special ids, and an empty chunk cache."""
        self.vocab = {i: bytes([i]) for i in range(256)}
        for (a, b), idx in self.merges.items():  # dicts keep insertion order = merge order
            self.vocab[idx] = self.vocab[a] + self.vocab[b]
        first = 256 + len(self.merges)
        self.special_ids = {s: first + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.vocab.update({i: s.encode("utf-8") for s, i in self.special_ids.items()})
        self.special_pattern = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
        self.cache = {}    # chunk -> ids: dialogues repeat the same few hundred chunks endlessly

    @property
    def vocab_size(self):
        return 256 + len(self.merges) + len(SPECIAL_TOKENS)

    def special(self, name):
        """Id of a special token, by its full string, e.g. special("<|audio|>")."""
        if name not in self.special_ids:
            raise KeyError(f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}")
        return self.special_ids[name]

    def train(self, texts, vocab_size=1024):
        """Learn vocab_size - 256 - len(SPECIAL_TOKENS) merges from an iterable of strings.
        Each distinct chunk is stored once, its pair statistics weighted by its count (fast on a
        small vocabulary). Stops early once every chunk is a single token, leaving vocab_size below
        the number asked for. ValueError for a vocab_size too small for the bytes and specials."""
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below the {256 + len(SPECIAL_TOKENS)} ids of bytes and specials")
        counts = Counter()
        for text in texts:
            for part in self.special_pattern.split(text):
                if part not in self.special_ids:  # special tokens are never merged into words
                    counts.update(self.pattern.findall(part))
        chunks = [list(c.encode("utf-8")) for c in counts]
        weights = list(counts.values())
        self.merges = {}
        for i in range(n_merges):
            stats = Counter()
            for ids, w in zip(chunks, weights):
                for pair in zip(ids, ids[1:]):
                    stats[pair] += w
            if not stats:  # every chunk is a single token already: nothing left to merge
                break
            pair = max(stats, key=stats.get)  # ties -> the pair seen first (deterministic)
            idx = 256 + i
            chunks = [merge(ids, pair, idx) if len(ids) > 1 else ids for ids in chunks]
            self.merges[pair] = idx
        self._build()

    def _encode_chunk(self, chunk):
        """One regex chunk -> ids: apply the learned merges, earliest-learned first (as in training)."""
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode_ordinary(self, text):
        """Text -> ids, treating special-token strings as ordinary characters (used for words
        from users and the simulator, so no text can ever forge a role or an audio span)."""
        ids = []
        for chunk in self.pattern.findall(text):
            if chunk not in self.cache:
                self.cache[chunk] = self._encode_chunk(chunk)
            ids.extend(self.cache[chunk])
        return ids

    def encode(self, text):
        """Text -> ids; special-token strings inside the text become their special ids."""
        ids = []
        for part in self.special_pattern.split(text):
            ids.extend([self.special_ids[part]] if part in self.special_ids else self.encode_ordinary(part))
        return ids

    def decode(self, ids):
        """Ids -> text. Exact inverse of encode; a byte sequence that is not valid UTF-8 (only
        possible for ids a model made up) decodes with U+FFFD replacement characters.
        ValueError for an id outside the vocabulary."""
        parts = []
        for i in map(int, ids):
            if i not in self.vocab:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            parts.append(self.vocab[i])
        return b"".join(parts).decode("utf-8", errors="replace")

    def state_dict(self):
        """Everything needed to rebuild the tokenizer, as plain JSON-serialisable lists."""
        return {"merges": [[a, b] for a, b in self.merges], "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_state_dict(cls, d):
        if d.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"tokenizer has special tokens {d.get('special_tokens')}, not this code's {SPECIAL_TOKENS}")
        tok = cls()
        tok.merges = {(int(a), int(b)): 256 + i for i, (a, b) in enumerate(d["merges"])}
        tok._build()
        return tok

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.state_dict(), f)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_state_dict(json.load(f))


# -----------------------------------------------------------------------------
# Part 2: the audio codec

def mel_filterbank():
    """(N_MELS, N_FFT // 2 + 1) triangular filters from 0 to SR / 2, equally spaced on the HTK mel
    scale mel = 2595 log10(1 + f / 700), each peaking at 1 on its centre frequency."""
    freqs = np.linspace(0, SR / 2, N_FFT // 2 + 1)
    mels = np.linspace(0.0, 2595.0 * np.log10(1.0 + SR / 2 / 700.0), N_MELS + 2)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)   # back to Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb, dtype=torch.float32)

class AudioCodec:
    """Stereo waveform (2, N) at SR <-> frames (T, 64) at FRAME_RATE, T = N // HOP.

    Frame t (centred on sample t * HOP) = log-mel of the left channel ++ log-mel of the right
    channel, log(mel power + 1e-5) in natural-log units (1 unit = 4.34 dB). `encode` also
    normalises each of the 64 dimensions to zero mean / unit variance with statistics fit on
    the training set, so the diffusion model sees unit-scale data.

    This is where a learned VAE would go (the paper: a DAC-style VAE per channel at 40 Hz, L/R
    latents stacked): swapping one in replaces encode_raw / decode_raw only. The fixed log-mel
    codec needs no training, but loses phase (Griffin-Lim recovers one) and fine spectral detail."""

    def __init__(self, mean=None, std=None):
        self.mel_fb = mel_filterbank()                  # (32, 513)
        self.mel_pinv = torch.linalg.pinv(self.mel_fb)  # (513, 32), computed once on the CPU
        self.window = torch.hann_window(N_FFT)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    # --- waveform <-> raw log-mel frames ---

    def _stft(self, x):
        """(..., N) -> complex (..., N_FFT // 2 + 1, N // HOP + 1)."""
        shape = x.shape[:-1]
        spec = torch.stft(x.reshape(-1, x.shape[-1]), N_FFT, HOP, window=self.window.to(x.device),
                          center=True, return_complex=True)
        return spec.reshape(*shape, *spec.shape[-2:])

    def _istft(self, spec, length):
        shape = spec.shape[:-2]
        x = torch.istft(spec.reshape(-1, *spec.shape[-2:]), N_FFT, HOP, window=self.window.to(spec.device),
                        center=True, length=length)
        return x.reshape(*shape, length)

    def encode_raw(self, wav):
        """wav (2, N) or (B, 2, N), numpy or torch -> raw log-mel frames (T, 64) or (B, T, 64),
        float32 on the wav's device, T = N // HOP (the last, half-empty STFT frame is dropped)."""
        x = torch.as_tensor(np.ascontiguousarray(wav) if isinstance(wav, np.ndarray) else wav, dtype=torch.float32)
        if x.dim() not in (2, 3) or x.shape[-2] != 2:
            raise ValueError(f"expected a stereo waveform shaped (2, N) or (B, 2, N), got {tuple(x.shape)}")
        if x.shape[-1] < N_FFT:
            raise ValueError(f"audio too short: {x.shape[-1]} samples, the codec needs {N_FFT} ({N_FFT * 1000 // SR} ms)")
        T = x.shape[-1] // HOP
        power = self._stft(x)[..., :T].abs() ** 2                          # (..., 2, 513, T)
        mel = torch.einsum("mf,...cft->...tcm", self.mel_fb.to(x.device), power)  # (..., T, 2, 32)
        return torch.log(mel + 1e-5).flatten(-2)                           # (..., T, 64): L ++ R

    def decode_raw(self, raw):
        """Raw log-mel frames (T, 64) or (B, T, 64) -> wav (2, T * HOP) or (B, 2, T * HOP) float32.
        1. undo the log; 2. mel -> linear power spectrum (below); 3. Griffin-Lim finds a phase
        consistent with those magnitudes. Frames outside what any waveform in [-1, 1] can have
        (e.g. latents pushed far off the data by a high CFG scale) are clamped first, so the output
        is always finite."""
        raw = torch.as_tensor(raw, dtype=torch.float32).nan_to_num(nan=math.log(1e-5)).clamp(max=MAX_LOG_MEL)
        T = raw.shape[-2]
        mel = torch.exp(raw).unflatten(-1, (2, N_MELS))                    # (..., T, 2, 32)
        power = self.mel_to_power(mel).movedim(-3, -1)                      # (..., 2, 513, T)
        mag = torch.sqrt(power)                                            # (..., 2, 513, T)
        # encode_raw dropped the final STFT frame of an N = T * HOP signal; repeat the last one
        # so the STFT of the length-N estimate and the target magnitudes line up frame for frame.
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)
        return self.griffin_lim(mag, T * HOP)

    def mel_to_power(self, mel, n_iter=30):
        """Mel power (..., 32) -> the non-negative linear power spectrum (..., 513) whose mel
        projection is closest to it: start from the filterbank's pseudo-inverse clamped at 0, then
        refine with multiplicative non-negative least-squares updates (Lee & Seung 2001), which
        keep every bin >= 0 (the clamped pseudo-inverse alone loses much of the spectral shape)."""
        fb = self.mel_fb.to(mel.device)                                    # (32, 513)
        power = (mel @ self.mel_pinv.to(mel.device).T).clamp(min=1e-10)
        target = mel @ fb
        for _ in range(n_iter):
            power = power * target / ((power @ fb.T) @ fb + 1e-10)
        return power

    def griffin_lim(self, mag, length, n_iter=32):
        """Magnitudes (..., 513, T + 1) -> waveform (..., length), by fast Griffin-Lim (Perraudin
        et al. 2013): alternate between "a signal with this phase" and "the STFT of that signal",
        with momentum 0.99. Initial phase from a fixed generator, so decoding is deterministic."""
        g = torch.Generator().manual_seed(0)
        phase = 2 * torch.pi * torch.rand(mag.shape, generator=g).to(mag.device)
        angles = torch.complex(torch.cos(phase), torch.sin(phase))
        rebuilt = torch.zeros_like(angles)
        momentum = 0.99
        for _ in range(n_iter):
            prev = rebuilt
            rebuilt = self._stft(self._istft(mag * angles, length))
            angles = rebuilt - (momentum / (1 + momentum)) * prev
            angles = angles / (angles.abs() + 1e-16)
        return self._istft(mag * angles, length)

    # --- normalisation: fit on the training set, stored in meta.json and every checkpoint ---

    def fit(self, raws):
        """Per-dimension mean / std over all frames of a list of raw (T, 64) tensors."""
        frames = torch.cat([torch.as_tensor(r).cpu().reshape(-1, 2 * N_MELS).double() for r in raws])  # MPS has no float64
        self.mean = frames.mean(0).float()
        self.std = frames.std(0).clamp(min=1e-3).float()  # a dimension that never moves must not divide by 0
        return self

    def _stats(self, like):
        if self.mean is None:
            raise RuntimeError("AudioCodec has no normalisation statistics: call fit() or load them with from_state_dict()")
        return self.mean.to(like.device), self.std.to(like.device)

    def normalize(self, raw):
        mean, std = self._stats(raw)
        return (raw - mean) / std

    def denormalize(self, z):
        mean, std = self._stats(z)
        return z * std + mean

    def encode(self, wav):
        """wav (2, N) -> normalised frames z (T, 64): the continuous latents the model generates."""
        return self.normalize(self.encode_raw(wav))

    def decode(self, z):
        """Normalised frames z (T, 64) (or (B, T, 64)) -> wav (2, T * HOP) float32."""
        return self.decode_raw(self.denormalize(torch.as_tensor(z, dtype=torch.float32)))

    # --- patches: PATCH consecutive frames -> one model token ---

    @staticmethod
    def patchify(z):
        """(..., T, 64) -> (..., T // PATCH, 128): frames 2k and 2k+1 side by side (a trailing
        odd frame is dropped; story durations are multiples of 0.1 s, so T is a multiple of 4)."""
        T = z.shape[-2] // PATCH * PATCH
        return z[..., :T, :].reshape(*z.shape[:-2], T // PATCH, LATENT_DIM)

    @staticmethod
    def unpatchify(p):
        """(..., T // PATCH, 128) -> (..., T, 64), the inverse of patchify."""
        return p.reshape(*p.shape[:-2], p.shape[-2] * PATCH, 2 * N_MELS)

    # --- persistence (plain lists: JSON in meta.json, weights_only-safe in checkpoints) ---

    def state_dict(self):
        if self.mean is None:
            raise RuntimeError("AudioCodec has no normalisation statistics to save: call fit() first")
        return {**CODEC_FORMAT, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, d):
        theirs = {k: d.get(k) for k in CODEC_FORMAT}
        if theirs != CODEC_FORMAT:
            raise ValueError(f"codec statistics were computed with {theirs}, this code uses {CODEC_FORMAT}")
        return cls(mean=d["mean"], std=d["std"])


# -----------------------------------------------------------------------------
# Part 3: the chat template
#
# One dialogue = one sequence, turns in chat order:
#   <|user|>{text}[<|audio|>{audio}<|/audio|>]<|end|>
#   <|assistant|>{calls or answer}[<|tool|>{plan}<|audio|>{audio}<|/audio|>]<|end|>
# e.g. a story turn:
#   <|user|>Tell a story: ava says "the old dog runs home", then a dog barks.<|end|><|assistant|>new_story()
#   speak(ava, "the old dog runs home")
#   sfx(dog_bark)<|tool|>story 4.6 s
#   1 ava "the old dog runs home" 0.3-2.2 s -1 dB pan 0.1
#   2 dog_bark 2.5-3.3 s -4 dB pan 0.2<|audio|>[92 audio tokens]<|/audio|><|end|>
# An assistant audio turn writes its tool calls (the chain of thought) and <|tool|>; the studio
# answers with the laid-out plan, which the model reads but never learns to write; then the audio.
# An understanding turn's user supplies the audio and the assistant answers in text (that turn's
# "plan" is ground truth for evaluation only and never enters the sequence).

def encode_dialogue(dialogue, latents, tok, cot=True):
    """A dialogue dict (see simulate_data.make_dialogue) + its audio as normalised frames -> one
    training sequence, a dict of tensors (L tokens, S audio spans):
      tokens (L,) long          text ids; audio positions hold <|pad|>
      audio (L, 128) float      clean patch latents at audio positions, 0 elsewhere
      span_id (L,) long         -1 for text, 0, 1, 2, ... for each audio span (= one clip)
      span_is_target (S,) bool  produced by the assistant (diffusion loss) vs given by the user
      text_target (L,) bool     tokens[i + 1] is an assistant text token to learn (CE target):
                                calls/answer words, <|tool|>, the <|audio|> after the plan and
                                the <|end|> closing the turn (the plan and <|/audio|> are not)
      is_plain_text (L,) bool   user/assistant words (dropped to <|null|> for CFG)
    latents: list of (T, 64) tensors, indexed by the turns' "audio" fields. Every turn has "text";
    an assistant audio turn has "tool" too (simulate_data.plan_to_text). cot=False (the paper's "no
    CoT" baseline): an assistant audio turn is its audio alone, no calls and no plan. ValueError for
    a malformed turn."""

    tokens, learn, plain, span_id, span_is_target, audio = [], [], [], [], [], {}

    def add(ids, learned, is_words, span=-1):
        tokens.extend(ids)
        learn.extend([learned] * len(ids))
        plain.extend([is_words] * len(ids))
        span_id.extend([span] * len(ids))

    def add_audio(index, by_assistant):
        if not 0 <= index < len(latents):
            raise IndexError(f"dialogue refers to audio {index}, but {len(latents)} latents were given")
        z = torch.as_tensor(latents[index], dtype=torch.float32)
        if z.dim() != 2 or z.shape[1] != 2 * N_MELS:
            raise ValueError(f"audio {index}: expected normalised frames (T, {2 * N_MELS}), got {tuple(z.shape)}")
        patches = AudioCodec.patchify(z)
        add([tok.special("<|audio|>")], by_assistant, False)
        audio[len(tokens)] = patches  # first position of the span -> its (T // PATCH, 128) latents
        add([tok.special("<|pad|>")] * len(patches), False, False, span=len(span_is_target))
        span_is_target.append(by_assistant)
        add([tok.special("<|/audio|>")], False, False)

    for k, turn in enumerate(dialogue["turns"]):
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f"turn {k}: role must be 'user' or 'assistant', got {role!r}")
        is_assistant = role == "assistant"
        if not isinstance(turn.get("text"), str):
            raise ValueError(f"turn {k} ({role}) has no text")
        add([tok.special(f"<|{role}|>")], False, False)
        if cot or "tool" not in turn:
            add(tok.encode_ordinary(turn["text"]), is_assistant, True)
        if "tool" in turn and cot:
            add([tok.special("<|tool|>")], is_assistant, False)
            add(tok.encode_ordinary(turn["tool"]), False, True)
        if "audio" in turn:
            add_audio(turn["audio"], is_assistant)
        add([tok.special("<|end|>")], is_assistant, False)

    # Each token above carries "is it a learned assistant token"; the model predicts token i + 1
    # at position i, so the CE target mask is that flag shifted left by one.
    learn = torch.tensor(learn, dtype=torch.bool)
    text_target = torch.zeros_like(learn)
    text_target[:-1] = learn[1:]
    audio_seq = torch.zeros(len(tokens), LATENT_DIM)
    for start, patches in audio.items():
        audio_seq[start:start + len(patches)] = patches
    return {"tokens": torch.tensor(tokens, dtype=torch.long), "audio": audio_seq,
            "span_id": torch.tensor(span_id, dtype=torch.long),
            "span_is_target": torch.tensor(span_is_target, dtype=torch.bool),
            "text_target": text_target, "is_plain_text": torch.tensor(plain, dtype=torch.bool)}
