"""
The toy audio world of AudioChat-mini: who speaks, what they can say, what else can sound, and how.

The paper's TTS and text-to-audio tools at toy scale, self-contained and deterministic: 6 voices (VOICES)
speak a closed 111-word language (WORD_CLASSES, LINE_TEMPLATES, VOCAB); 14 sound effects (SFX), 3 ambiences
(AMBIENCES), 2 music beds (MUSIC), all 16 kHz. A line lasts as long as its voice takes to say it, whatever
the seed (speech_duration), so the studio (simulate_data.py) lays out a plan unheard. No command: hear it
with `python simulate_data.py --demo out/demo`.

Read line by line: down to the "synthesizers" banner. Skim the rest (DSP helpers, the formant speech
synthesizer, the effects, the beds, and the SFX / AMBIENCES / MUSIC tables at the end): the other files use
their names and lengths, and call them only to render (simulate_data.dry_signal).
"""

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

SR = 16000   # Hz, the audio format of the whole project (stereo float32, (2, N))

@dataclass(frozen=True)
class Voice:
    f0: float        # mean pitch, Hz
    formant: float   # vocal-tract scale: multiplies every formant (timbre: larger = smaller speaker)
    rate: float      # speaking rate: divides every phoneme duration
    tilt: float      # spectral tilt of the glottal source (larger = darker, softer voice)
    breath: float    # aspiration noise mixed into voiced sounds

VOICES = {
    "ava":  Voice(f0=210, formant=1.17, rate=1.05, tilt=1.0, breath=0.10),
    "ben":  Voice(f0=120, formant=1.02, rate=0.95, tilt=0.7, breath=0.02),
    "cleo": Voice(f0=260, formant=1.25, rate=1.15, tilt=1.3, breath=0.05),
    "dan":  Voice(f0=88,  formant=0.90, rate=0.85, tilt=1.4, breath=0.12),
    "eve":  Voice(f0=175, formant=1.10, rate=0.90, tilt=1.2, breath=0.20),
    "finn": Voice(f0=145, formant=1.06, rate=1.10, tilt=0.9, breath=0.04),
}

# The language: lines come from little templates whose slots take words of one class ("the old
# dog runs home", "hello my friend"); the vocabulary is exactly the words they can produce.
WORD_CLASSES = {
    "DET": ["the", "a", "my", "your", "our"],
    "ADJ": ["old", "young", "big", "little", "dark", "cold", "warm", "quiet", "happy", "lost", "brave", "tired"],
    "NOUN": ["dog", "cat", "bird", "man", "girl", "boy", "king", "queen", "ship", "sea", "moon", "sun",
             "storm", "door", "house", "road", "tree", "fire", "night", "town", "bell", "book", "friend",
             "river", "horse", "forest", "garden", "window", "train", "baby"],
    "VERB_I": ["runs", "walks", "sings", "sleeps", "waits", "falls", "comes", "goes", "laughs", "cries"],
    "VERB_T": ["see", "hear", "find", "know", "like", "need", "open", "follow"],
    "PRON": ["i", "we", "you", "they"],
    "PLACE": ["home", "away", "here", "there", "now", "again", "tonight", "soon", "outside", "back", "up", "down"],
    "PREP": ["in", "on"],
}
LINE_TEMPLATES = [
    "DET ADJ NOUN VERB_I", "DET NOUN VERB_I PLACE", "DET ADJ NOUN VERB_I PLACE", "PRON VERB_T DET NOUN",
    "PRON VERB_T DET ADJ NOUN", "where is DET NOUN", "hello DET NOUN", "hello DET ADJ NOUN",
    "look at DET NOUN", "listen to DET NOUN", "come PLACE", "go PLACE", "run PLACE", "good morning DET NOUN",
    "yes PRON VERB_T it", "PRON VERB_T it all", "it was not DET NOUN", "DET NOUN is ADJ", "DET NOUN is very ADJ",
    "it was DET ADJ NOUN", "DET NOUN and DET NOUN", "stop DET NOUN", "hurry up", "please wait PLACE",
    "thank you DET NOUN", "goodbye DET NOUN", "what is this", "DET NOUN is PREP DET NOUN", "no PRON VERB_I PLACE",
]
VOCAB = sorted(set(w for ws in WORD_CLASSES.values() for w in ws) |
               set(w for t in LINE_TEMPLATES for w in t.split() if w not in WORD_CLASSES))

def pick(rng, items):
    return items[int(rng.integers(len(items)))]

def ceil_tenth(x):
    """Round a time up to the 0.1 s grid of the plan (the 1e-6 absorbs float noise: 0.30000001 -> 0.3)."""
    return math.ceil(round(x * 10, 6)) / 10


# -----------------------------------------------------------------------------
# The speech timing: how long a line lasts (the TTS's job)

def phoneme_timeline(voice, text):
    """The phonemes of a line with their times -> ([(phoneme, start_s, dur_s, word_index)], end_s).
    Timing depends only on the voice's rate and the words, never on a seed: this is what makes a
    speech source's duration derivable from the plan. KeyError for a voice not in VOICES or a word
    not in VOCAB (the studio checks a line first: simulate_data.derived_dur)."""
    rate, segs, t = VOICES[voice].rate, [], 0.0
    for wi, word in enumerate(text.split()):
        if wi:
            t += WORD_GAP / rate
        for ph in WORD_CODES[word]:
            d = PHONEMES[ph]["dur"] / rate
            segs.append((ph, t, d, wi))
            t += d
    return segs, t

def speech_duration(voice, text):
    """The derived `dur` of a speech source: the line's length rounded up to 0.1 s."""
    return ceil_tenth(phoneme_timeline(voice, text)[1] + SPEECH_TAIL)


# =============================================================================
# The synthesizers (skim). The rest of the project uses their names (VOICES, SFX, AMBIENCES, MUSIC at the
# end), their lengths (speech_duration; an effect's fixed length) and, in simulate_data.dry_signal, the
# synthesizers. The timing above reads PHONEMES' durations, WORD_CODES, WORD_GAP and SPEECH_TAIL below.
# All of it works on whole numpy arrays, never sample by sample, and draws its variation from the rng it is
# given (dry_signal seeds one per source).
# =============================================================================

CTRL = 80   # control-rate hop in samples (200 Hz): envelopes, formants, pitch

def rms(x):
    return float(np.sqrt(np.mean(np.square(x)) + 1e-12))

def band_shape(f, lo, hi):
    """Magnitude response of a smooth band-pass (4th-order Butterworth-like edges) at f Hz."""
    return 1 / np.sqrt(1 + (lo / np.maximum(f, 1.0)) ** 8) / np.sqrt(1 + (f / hi) ** 8)

def band_noise(rng, n, lo, hi):
    """Noise band-limited to about [lo, hi] Hz, unit RMS -> (n,) float32: Gaussian Fourier
    coefficients shaped by band_shape, one inverse FFT of a fast length."""
    nf = n if n % 1600 == 0 else 1 << (n - 1).bit_length()   # plan lengths (0.1 s grid) are fast already
    mask = band_shape(np.fft.rfftfreq(nf, 1 / SR), lo, hi)
    x = np.fft.irfft((rng.standard_normal(len(mask)) + 1j * rng.standard_normal(len(mask))) * mask, nf)[:n]
    return (x / rms(x)).astype(np.float32)

@functools.lru_cache(maxsize=None)
def noise_bank(lo, hi):
    """A fixed 8 s (the longest story) band noise per band: speech cuts its consonant noises out of it."""
    return band_noise(np.random.default_rng([lo, hi]), 8 * SR, lo, hi)

def bank_noise(rng, n, lo, hi):
    """n samples of band noise from the bank, at a random offset -> (n,)."""
    i0 = int(rng.integers(len(noise_bank(lo, hi)) - n + 1))
    return noise_bank(lo, hi)[i0:i0 + n]

def decay_env(n, attack, tau):
    """Linear attack over `attack` s, then exponential decay with time constant tau s -> (n,)."""
    t = np.arange(n) / SR
    return (np.minimum(t / attack, 1.0) * np.exp(-np.maximum(t - attack, 0.0) / tau)).astype(np.float32)

def fade(x, t_in=0.005, t_out=0.01):
    """Short raised-cosine fades at both ends, so no source starts or stops with a click."""
    up, down = ((np.sin(np.linspace(0, np.pi / 2, max(1, int(t * SR)))) ** 2).astype(np.float32) for t in (t_in, t_out))
    x = x.copy()
    x[:len(up)] *= up
    x[-len(down):] *= down[::-1]
    return x

def add_events(out, onsets, event):
    """Add an event at each onset (s) into out, clipped at the end -> out. event: an array, or a
    function i -> the i-th event, called in onset order (so each event may draw from the rng)."""
    for i, t0 in enumerate(onsets):
        e = event(i) if callable(event) else event
        i0 = int(t0 * SR)
        out[i0:i0 + len(e)] += e[:len(out) - i0]
    return out

def smooth(x, width):
    """Moving Hann-window average along the last axis (edges padded), width in control frames."""
    w = np.hanning(width + 2)[1:-1]
    w /= w.sum()
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(width, width)], mode="edge")
    return np.apply_along_axis(lambda r: np.convolve(r, w, mode="same"), -1, xp)[..., width:-width]

def random_curve(rng, n, rate, step=1):
    """A smooth random curve in [0, 1], about `rate` wiggles per s, every `step` of n samples."""
    pts = rng.random(int(n / SR * rate) + 3)
    return np.interp(np.arange(0, n, step), np.linspace(0, n, len(pts)), pts).astype(np.float32)

def upsample(x, n):
    """Control-rate values (..., C) -> per-sample (..., n) by linear interpolation (hop CTRL)."""
    pos = np.arange(n) / CTRL
    i = np.minimum(pos.astype(np.int64), x.shape[-1] - 2)
    w = (pos - i).astype(np.float32)
    return x[..., i] * (1 - w) + x[..., i + 1] * w

def harmonic_stack(f0, amps, n):
    """Additive synthesis sum_k A_k(t) sin(k phase(t)): f0 (C,) Hz, amps (K, C) at control rate
    -> (n,). sin(k phase) by the Chebyshev recurrence, amplitudes blended once per block: fast."""
    blocks = -(-n // CTRL)
    phase = np.mod(2 * np.pi * np.cumsum(upsample(f0, n).astype(np.float64)) / SR, 2 * np.pi)
    ph = np.pad(phase, (0, blocks * CTRL - n)).reshape(blocks, CTRL).astype(np.float32)   # sample j of block c
    two_cos, s_prev, s = 2 * np.cos(ph), np.zeros_like(ph), np.sin(ph)
    acc0, acc1 = np.zeros_like(ph), np.zeros_like(ph)
    for a in amps.astype(np.float32):   # sin((k+1)x) = 2 cos(x) sin(kx) - sin((k-1)x)
        acc0 += a[:blocks, None] * s
        acc1 += a[1:blocks + 1, None] * s
        s_prev, s = s, two_cos * s - s_prev
    w = np.arange(CTRL, dtype=np.float32) / CTRL
    return (acc0 * (1 - w) + acc1 * w).reshape(-1)[:n]

def formant_tone(f0, formants, bandwidths, tilt, n, top=np.inf, harmonics=None, amp=1.0):
    """Source-filter synthesis -> (n,): the harmonics of f0 (C,) Hz below `top` Hz (or the first
    `harmonics`), the k-th at k^-tilt (the source), times the gain of a cascade of resonators
    (the tract) at `formants` (F, C) or (F, 1) Hz with `bandwidths` (F,) Hz, times amp (C,)."""
    k = np.arange(1, (harmonics or int(top / f0.min())) + 1)[:, None]
    fk = k * f0   # (K, C): the harmonics' frequencies over time
    g = 1.0
    for F, B in zip(np.asarray(formants), bandwidths):
        g = g * F ** 2 / np.sqrt((F ** 2 - fk ** 2) ** 2 + (B * fk) ** 2)
    return harmonic_stack(f0, g * k ** -tilt * amp * (fk < top), n)


# --- speech: phonemes, the words' phoneme codes, the formant synthesizer -------------------
# Vowels have three formants (Hz, scaled per voice; "ai" glides to F_end); fricatives are noise
# bands, plosives a closure then a burst, nasals and "l" weak voiced sounds. dur in s at rate 1.

PHONEMES = {
    "i":  dict(kind="vowel", dur=0.13, F=(280, 2250, 2900), amp=1.0),
    "e":  dict(kind="vowel", dur=0.13, F=(530, 1850, 2500), amp=1.0),
    "ae": dict(kind="vowel", dur=0.14, F=(720, 1650, 2450), amp=1.0),
    "a":  dict(kind="vowel", dur=0.14, F=(760, 1100, 2450), amp=1.0),
    "o":  dict(kind="vowel", dur=0.14, F=(480, 800, 2500), amp=1.0),
    "u":  dict(kind="vowel", dur=0.13, F=(300, 850, 2250), amp=0.9),
    "er": dict(kind="vowel", dur=0.14, F=(480, 1350, 1650), amp=0.9),
    "ai": dict(kind="vowel", dur=0.18, F=(740, 1200, 2500), F_end=(320, 2150, 2900), amp=1.0),
    "m":  dict(kind="voiced", dur=0.07, F=(250, 1100, 2300), amp=0.3),
    "n":  dict(kind="voiced", dur=0.07, F=(250, 1700, 2600), amp=0.3),
    "l":  dict(kind="voiced", dur=0.06, F=(360, 1100, 2800), amp=0.55),
    "s":  dict(kind="fricative", dur=0.10, band=(4000, 7500), amp=0.6),
    "sh": dict(kind="fricative", dur=0.10, band=(1900, 3800), amp=0.6),
    "f":  dict(kind="fricative", dur=0.09, band=(900, 7000), amp=0.25),
    "h":  dict(kind="fricative", dur=0.07, band=(500, 3000), amp=0.25),
    "p":  dict(kind="plosive", dur=0.08, band=(300, 1500), amp=0.9),
    "t":  dict(kind="plosive", dur=0.08, band=(3000, 6500), amp=0.9),
    "k":  dict(kind="plosive", dur=0.08, band=(1400, 3000), amp=0.9),
}
VOWELS = [p for p, d in PHONEMES.items() if d["kind"] == "vowel"]
CONSONANTS = [p for p, d in PHONEMES.items() if d["kind"] != "vowel"]
WORD_GAP = 0.07      # s of silence between words (at rate 1)
SPEECH_TAIL = 0.03   # s of release after the last phoneme

def _one_slip(code):
    """Every phoneme sequence one substitution, insertion or deletion away from code, and code."""
    splits = [(code[:i], code[i:]) for i in range(len(code) + 1)]
    return ({code} | {a + (p,) + b for a, b in splits for p in PHONEMES}            # insertions
            | {a + b[1:] for a, b in splits if b}                                  # deletions
            | {a + (p,) + b[1:] for a, b in splits if b for p in PHONEMES})        # substitutions

def _assign_word_codes():
    """A fixed phoneme code per word: CVC for one syllable, CVCV or CVCVC for more, drawn until it
    is >= 2 phoneme edits from every earlier code (no two words one slip apart)."""
    rng, codes, taken = np.random.default_rng(1234), {}, set()
    for word in VOCAB:
        groups = len(re.findall("[aeiouy]+", word))          # vowel groups: about the syllables
        groups -= word.endswith("e") and groups > 1          # silent final e: "home" is one syllable
        level = 0 if groups <= 1 else 1 + int(rng.integers(2))
        for attempt in range(10_000):   # when the short codes run out, a longer shape
            shape = ("CVC", "CVCV", "CVCVC")[min(level + attempt // 300, 2)]
            code = tuple(pick(rng, VOWELS) if s == "V" else pick(rng, CONSONANTS) for s in shape)
            if code not in taken:
                codes[word] = code
                taken |= _one_slip(code)
                break
    return codes

WORD_CODES = _assign_word_codes()

def synth_speech(voice, text, rng):
    """One line of speech -> mono (round(speech_duration * SR),). Source-filter model: per control
    frame, formant targets and voicing of the current phoneme, smoothed (coarticulation); a
    harmonic stack at the voice's pitch through the formants; consonant noise on top. The seed
    moves only the pitch contour (declination, word accents, jitter), never the timing."""
    v = VOICES[voice]
    segs, end = phoneme_timeline(voice, text)
    n = round(speech_duration(voice, text) * SR)
    C = n // CTRL + 2
    F, av, accent = np.full((3, C), np.nan), np.zeros(C), np.zeros(C)
    word_accent = rng.uniform(-0.04, 0.09, size=len(text.split()))
    for ph, t0, d, wi in segs:
        p = PHONEMES[ph]
        i0 = int(t0 * SR / CTRL)
        i1 = max(i0 + 1, int((t0 + d) * SR / CTRL))
        accent[i0:i1] = word_accent[wi]
        if p["kind"] in ("vowel", "voiced"):
            F[:, i0:i1] = np.linspace(p["F"], p.get("F_end", p["F"]), i1 - i0).T
            av[i0:i1] = p["amp"]
    idx = np.arange(C)
    known = ~np.isnan(F[0])   # during noise and silence the tract already moves to the next sound
    F = np.stack([np.interp(idx, idx[known], row[known]) for row in F]) * v.formant
    F, av = smooth(F, 7), smooth(av, 5)
    f0 = v.f0 * (1 + 0.06 - 0.12 * (idx * CTRL / SR) / max(end, 1e-3)) * (1 + smooth(accent, 15)) \
        * (1 + 0.02 * (random_curve(rng, C * CTRL, 4, CTRL) - 0.5))
    x = formant_tone(f0, F, np.array([90, 110, 170]) * v.formant, v.tilt, n, top=4000, amp=av)
    voiced = upsample(av, n)
    x /= rms(x[voiced > 0.5]) if np.any(voiced > 0.5) else rms(x)
    x += v.breath * bank_noise(rng, n, 1000, 5000) * voiced
    for ph, t0, d, _ in segs:
        p = PHONEMES[ph]
        if p["kind"] == "fricative":
            m = int(d * SR)
            add_events(x, [t0], bank_noise(rng, m, *p["band"]) * p["amp"] * fade(np.ones(m, np.float32), 0.015, 0.015))
        elif p["kind"] == "plosive":   # closure (silence), then a 15 ms burst and 20 ms aspiration
            m = int(0.035 * SR)
            add_events(x, [t0 + d - 0.035], bank_noise(rng, m, *p["band"]) * p["amp"] * decay_env(m, 0.001, 0.012))
    return fade(0.1 * x / rms(x[: int(end * SR)])).astype(np.float32)


# --- sound effects: fn(rng, n) -> mono (n,), n its fixed length; the rng varies pitch, timing, texture

def dog_bark(rng, n):
    """Two 'woofs': a falling harmonic tone through an open-vowel tract, plus rough noise."""
    m = int(0.17 * SR)
    def woof(i):
        f0 = np.linspace(1, 0.7, m // CTRL + 2) * rng.uniform(430, 620)
        F = np.array([[700.0], [1500.0], [2600.0]]) * rng.uniform(0.9, 1.1)
        tone = formant_tone(f0, F, [250, 300, 400], 0.7, m, harmonics=12)
        return (tone / rms(tone) + 0.6 * band_noise(rng, m, 400, 3500)) * decay_env(m, 0.006, 0.05)
    return add_events(np.zeros(n, np.float32), [0.0, rng.uniform(0.24, 0.30)], woof)

def knock(rng, n):
    """Three knocks on wood: two damped low modes and a short click."""
    f1, f2 = rng.uniform(150, 220), rng.uniform(380, 520)
    t = np.arange(int(0.12 * SR)) / SR
    def hit(i):
        body = np.sin(2 * np.pi * f1 * t) * np.exp(-t / 0.02) + 0.6 * np.sin(2 * np.pi * f2 * t) * np.exp(-t / 0.012)
        return rng.uniform(0.8, 1.0) * (body + 0.5 * band_noise(rng, len(t), 1000, 4000) * np.exp(-t / 0.004))
    return add_events(np.zeros(n, np.float32), np.arange(3) * rng.uniform(0.13, 0.17), hit)

def bell(rng, n):
    """A struck bell: long-ringing inharmonic partials, the low ones longest, and a bright strike."""
    f, t = rng.uniform(450, 800), np.arange(n) / SR
    ratios = np.array([0.5, 1.0, 1.19, 1.5, 2.0, 2.52, 2.67, 3.01])[:, None]
    amps = np.array([0.4, 1.0, 0.6, 0.35, 0.5, 0.25, 0.2, 0.15])[:, None]
    x = (amps * np.sin(2 * np.pi * f * ratios * t) * np.exp(-t / (0.8 / ratios ** 0.6))).sum(0)
    return x + 0.3 * band_noise(rng, n, 2000, 6000) * decay_env(n, 0.001, 0.005)

def footsteps(rng, n):
    """Four steps: a low thud and a scuff of grit, at a walking pace."""
    m = int(0.15 * SR)
    def step(i):
        return rng.uniform(0.7, 1.0) * (band_noise(rng, m, 60, 350) * decay_env(m, 0.002, 0.03)
                                        + 0.4 * band_noise(rng, m, 1500, 4000) * decay_env(m, 0.001, 0.012))
    return add_events(np.zeros(n, np.float32), rng.uniform(0.26, 0.3) * np.arange(4) + rng.uniform(0, 0.02, 4), step)

def glass_break(rng, n):
    """A bright crash, then shards tinkling: many short high sine pings at random times."""
    x = band_noise(rng, n, 2500, 7800) * decay_env(n, 0.001, 0.06)
    onsets = np.minimum(rng.exponential(0.15, 30), 0.6)
    amp, f, tau = rng.uniform([0.15, 2500, 0.01], [0.5, 7000, 0.05], (30, 3)).T   # each shard's level, pitch, ring
    t = np.arange(int(0.2 * SR)) / SR
    return add_events(x, onsets, lambda i: amp[i] * np.sin(2 * np.pi * f[i] * t) * np.exp(-t / tau[i]))

def car_horn(rng, n):
    """Two brassy harmonic tones a major third apart, held steady (the beating is the 'honk')."""
    f1 = rng.uniform(360, 440)
    x = sum(formant_tone(np.full(n // CTRL + 2, f), [[1000.0], [2000.0], [3000.0]], [400, 500, 600], 0.6, n, harmonics=15)
            for f in (f1, f1 * 1.26))
    return fade(x, 0.015, 0.03)

def bird_chirp(rng, n):
    """Three quick upward whistled sweeps, high up (2-5 kHz)."""
    def chirp(i):
        f = np.linspace(rng.uniform(2000, 3000), rng.uniform(3800, 5000), int(0.09 * SR))
        return np.sin(2 * np.pi * np.cumsum(f) / SR) * np.sin(np.linspace(0, np.pi, len(f))) ** 2
    return add_events(np.zeros(n, np.float32), np.arange(3) * rng.uniform(0.15, 0.2), chirp)

def thunder(rng, n):
    """A crack, then a long low rumble whose loudness rolls at random."""
    crack = band_noise(rng, n, 300, 5000) * decay_env(n, 0.002, 0.08)
    rumble = band_noise(rng, n, 25, 200) * (0.3 + random_curve(rng, n, 6)) * decay_env(n, 0.15, 0.7)
    return crack + 2.0 * rumble

def clock_tick(rng, n):
    """Tick ... tock: four short clicks, exactly 0.25 s apart, alternating in pitch."""
    f, t = rng.uniform(2500, 3500), np.arange(int(0.03 * SR)) / SR
    def click(i):   # tick (even i) higher than tock
        ring = np.sin(2 * np.pi * f * (1 - 0.25 * (i % 2)) * t) * np.exp(-t / 0.006)
        return band_noise(rng, len(t), *[(2500, 6000), (1500, 4000)][i % 2]) * np.exp(-t / 0.003) + 0.5 * ring
    return add_events(np.zeros(n, np.float32), 0.25 * np.arange(4), click)

def applause(rng, n):
    """Many hands: a dense random train of short noisy claps (FFT convolution), swelling and dying."""
    count = int(rng.uniform(150, 220))
    imp = np.bincount(rng.integers(0, n - int(0.05 * SR), count), rng.uniform(0.3, 1.0, count), minlength=n)
    m = int(0.02 * SR)
    kernel = band_noise(rng, m, 800, 3500) * decay_env(m, 0.0005, 0.005)
    x = np.fft.irfft(np.fft.rfft(imp, n + m) * np.fft.rfft(kernel, n + m), n + m)[:n]
    return x * np.minimum(1, np.arange(n) / (0.1 * SR)) * np.minimum(1, (n - np.arange(n)) / (0.4 * SR))

def whistle(rng, n):
    """A person whistling: a nearly pure tone that rises then falls, with vibrato and breath."""
    t = np.arange(n // CTRL + 2) * CTRL / SR
    f = rng.uniform(1500, 2300) * (1 + 0.15 * np.sin(np.pi * t / (n / SR)) + 0.015 * np.sin(2 * np.pi * 6 * t))
    x = harmonic_stack(f, np.array([[1.0], [0.05]]) * np.ones(len(t)), n)
    return fade(x + 0.05 * band_noise(rng, n, 1000, 4000), 0.03, 0.06)

def door_creak(rng, n):
    """Stick-slip friction: a buzzy, low, wandering pitch through wooden resonances, stuttering."""
    f0 = 60 + 90 * random_curve(rng, (n // CTRL + 2) * CTRL, 4, CTRL)
    F = np.array([[900.0], [1700.0], [2800.0]]) * rng.uniform(0.85, 1.15)
    x = formant_tone(f0, F, [150, 200, 250], 0.3, n, top=7000, harmonics=66)
    return fade(x * (0.2 + random_curve(rng, n, 8)) ** 2, 0.05, 0.1)

def phone_ring(rng, n):
    """An old telephone: two bursts of a dual tone, trilled at 20 Hz."""
    t = np.arange(int(0.4 * SR)) / SR
    f = rng.uniform(900, 1100)
    trill = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * 20 * t))
    ring = fade((np.sin(2 * np.pi * f * t) + np.sin(2 * np.pi * 1.25 * f * t)) * trill)
    return add_events(np.zeros(n, np.float32), [0.0, 0.55], ring)

def cat_meow(rng, n):
    """Mee-ow: a high pitch rising then falling while the 'mouth' glides from i through a to u."""
    s = np.linspace(0, 1, n // CTRL + 2)
    f0 = rng.uniform(420, 520) * (1 + 0.5 * np.sin(np.pi * s ** 0.7))
    F = np.stack([np.interp(s, [0, 0.4, 1], f) for f in ([300, 900, 400], [2300, 1500, 1000], [3000] * 3)]) * 1.3
    return fade(formant_tone(f0, F, [150, 200, 300], 0.8, n, top=7000), 0.05, 0.15)

SFX = {   # name -> (fixed length in s, synthesizer)
    "dog_bark": (0.5, dog_bark), "knock": (0.5, knock), "bell": (1.5, bell), "footsteps": (1.2, footsteps),
    "glass_break": (0.8, glass_break), "car_horn": (0.8, car_horn), "bird_chirp": (0.6, bird_chirp),
    "thunder": (2.0, thunder), "clock_tick": (1.0, clock_tick), "applause": (1.5, applause),
    "whistle": (0.8, whistle), "door_creak": (1.0, door_creak), "phone_ring": (1.0, phone_ring),
    "cat_meow": (0.8, cat_meow),
}

# --- beds (ambiences and music) of any length. Ambiences are noise whose short-time spectrum follows
# a designed spectrogram (frames x bins), drawn in the frequency domain and overlap-added.
TEX_N, TEX_HOP = 512, 256
TEX_F = np.fft.rfftfreq(TEX_N, 1 / SR)   # the texture's bin frequencies, Hz

def noise_texture(rng, shape, n):
    """shape (frames, bins) magnitudes -> noise (n,): Gaussian Fourier coefficients times the shape,
    inverse FFT per frame, sine window, 50 % overlap-add (its squares sum to 1)."""
    spec = shape.astype(np.float32) * (rng.standard_normal(shape.shape, dtype=np.float32)
                                       + 1j * rng.standard_normal(shape.shape, dtype=np.float32))
    x = np.fft.irfft(spec, TEX_N, axis=-1) * np.sin(np.pi * (np.arange(TEX_N) + 0.5) / TEX_N)
    return (x[1:, :TEX_HOP] + x[:-1, TEX_HOP:]).reshape(-1)[:n].astype(np.float32)

def rain(rng, n):
    """Hiss of many drops (bright noise over a soft low wash), plus close drops as sharp clicks."""
    shape = band_shape(TEX_F, 800, 7500) * (np.maximum(TEX_F, 20) / 1000) ** -0.3 + 0.3 * band_shape(TEX_F, 60, 300)
    x = noise_texture(rng, shape[None, :] * (0.9 + 0.2 * random_curve(rng, n + 2 * TEX_HOP, 3, TEX_HOP))[:, None], n)
    x /= rms(x)
    m = int(0.01 * SR)
    drop = band_noise(rng, m, 2000, 7000) * decay_env(m, 0.0005, 0.002)
    return add_events(x, rng.uniform(0, n / SR, int(n / SR * 40)), lambda i: rng.uniform(0.3, 1.2) * drop)

def wind(rng, n):
    """Low roaring noise in slow random gusts, with a faint whistling resonance at the peaks."""
    g1, g2 = (random_curve(rng, n + 2 * TEX_HOP, rate, TEX_HOP)[:, None] for rate in (0.8, 1.2))
    fw = rng.uniform(600, 900)
    shape = (band_shape(TEX_F, 80, 500) * (0.3 + g1) + 0.6 * band_shape(TEX_F, 300, 1200) * g2
             + 3.0 * band_shape(TEX_F, fw - 40, fw + 40) * g2 ** 2)
    return noise_texture(rng, shape, n)

def crowd(rng, n):
    """Babble: six talkers, each noise with two vowel-like formant peaks, on and off at syllable rate."""
    talkers = 6
    F1, F2 = rng.uniform(300, 800, (talkers, 1)), rng.uniform(900, 2500, (talkers, 1))   # two formants each, Hz
    masks = 1 / (1 + ((TEX_F - F1) / 150) ** 2) + 0.7 / (1 + ((TEX_F - F2) / 250) ** 2)      # (talkers, bins)
    syll = np.stack([random_curve(rng, n + 2 * TEX_HOP, rng.uniform(6, 10), TEX_HOP) for _ in range(talkers)]) ** 2
    return noise_texture(rng, syll.T @ masks, n)

def _melody(rng, n, step_beats):
    """A random walk on a pentatonic scale -> [(onset s, length s, frequency Hz)]."""
    root = 220 * 2 ** (rng.integers(0, 12) / 12)
    scale = np.array([0, 2, 4, 7, 9, 12, 14, 16, 19, 21])
    beat = 60 / rng.uniform(90, 130)
    notes, t, i = [], 0.0, int(rng.integers(2, 7))
    while t < n / SR:
        length = beat * step_beats[rng.integers(len(step_beats))]
        notes.append((t, length, root * 2 ** (scale[i] / 12)))
        i = int(np.clip(i + rng.choice([-2, -1, 1, 2]), 0, len(scale) - 1))
        t += length
    return notes

_t = np.arange(SR, dtype=np.float32) / SR                      # a note rings for 1 s
_k = np.arange(1, 9, dtype=np.float32)[:, None]                  # 8 partials
PIANO_PARTIALS = 2 * np.pi * _k * np.sqrt(1 + 4e-4 * _k ** 2) * _t    # phase / f0: slightly stretched partials
PIANO_ENV = _k ** -1.3 * np.exp(-_t * _k ** 0.5 / 0.5) * np.minimum(1, _t / 0.003)   # upper partials die first

def piano(rng, n):
    """Piano: struck notes of 8 slightly inharmonic partials; each pitch synthesized once."""
    @functools.lru_cache(maxsize=None)
    def note(f):
        return fade((np.sin(PIANO_PARTIALS * np.float32(f)) * PIANO_ENV).sum(0), 0.001, 0.05)   # float32 throughout
    out = np.zeros(n, np.float32)
    for t0, _, f in _melody(rng, n, [0.5, 1, 1, 2]):
        add_events(out, [t0], note(f))
        if rng.random() < 0.3:   # now and then a bass note an octave below
            add_events(out, [t0], 0.5 * note(f / 2))
    return out

def flute(rng, n):
    """Flute: legato notes, almost a pure tone with weak overtones, vibrato, and breath noise."""
    C = n // CTRL + 2
    tc = np.arange(C) * CTRL / SR
    f0, gate = np.zeros(C), np.zeros(C)
    for t0, length, f in _melody(rng, n, [1, 1, 2, 3]):
        sel = (tc >= t0) & (tc < t0 + length)
        f0[sel] = 2 * f
        gate[sel & (tc < t0 + length - 0.05)] = 1   # a short breath between notes
    f0, gate = smooth(f0, 6) * (1 + 0.01 * np.sin(2 * np.pi * 5 * tc)), smooth(gate, 8)
    x = harmonic_stack(f0, np.array([1.0, 0.3, 0.1, 0.04])[:, None] * gate, n)
    return x + 0.08 * band_noise(rng, n, 1000, 4000) * upsample(gate, n)

AMBIENCES = {"rain": rain, "wind": wind, "crowd": crowd}
MUSIC = {"piano": piano, "flute": flute}
SOUNDS = {"sfx": SFX, "ambience": AMBIENCES, "music": MUSIC}
