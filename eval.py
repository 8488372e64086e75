"""
Evaluate AudioChat-mini the way the paper does, at toy scale: StoryGen-Eval-toy (the test split
written by simulate_data.py), a judge model, the paper's metrics, and the paper's systems side by
side.

    python eval.py --ckpt out/ckpt.pt                                   # ~3 min on a 2-core CPU (+4 for the judge, once)
    python eval.py --ckpt out/ckpt.pt --ckpt out/dense/ckpt.pt          # + the architecture ablation
    python eval.py --bench [--ckpt out/ckpt.pt]                         # speed tables, OUT_DIR/bench.json
    python eval.py --help                                               # every flag

Prints the paper's tables (storytelling, editing per sub-task, understanding) as markdown and
writes OUT_DIR/eval.json, OUT_DIR/eval.png and OUT_DIR/report.html (open it in a browser: a few
dialogues turn by turn, with players, spectrograms and plans, then the tables and loss curves).
The judge is trained once (about 4 minutes on a 2-core CPU) and cached in OUT_DIR/judge.pt.

The file reads top to bottom:
1. the judge, "FLAM-lite": a frame-wise sound-event detector trained on simulator ground truth
   with FLAM's per-class sigmoid loss; the stand-in for OpenFLAM, which the paper's metrics use;
2. the metrics: multiFLAM, deltaMultiFLAM, editFLAM (on the judge), KAD (on judge embeddings),
   tcpWER (MeetEval's definition), caption multiFLAM, plan validity and plan recall;
3. the systems: ground truth, AudioChat, a cascade (the toy WavJourney) with and without audio
   context, and any other checkpoint (the architecture ablation);
4. the benchmark: run every system on the first n test dialogues, tabulate, plot; and what each
   model's denoiser knows (one step from the true audio at each noise level);
5. the report: out/report.html, a few dialogues turn by turn with players and pictures;
6. speed benchmarks (--bench): attention backends, training throughput, the KV and prefix
   caches, DPM-Solver++ against DDIM, end-to-end latency per story.

The numbers are only as good as the judge (its held-out frame F1 is printed with them), and they
are not comparable with the paper's: the world, the judge and the embedding are toys.
"""
import glob
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, fields
from html import escape

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tokenizer import SR, HOP, FRAME_RATE, N_MELS, PATCH, LATENT_DIM, AudioCodec, BPETokenizer, encode_dialogue
from train import PRESETS, TrainConfig, autocast_for, load_checkpoint, opt, pack, parse_config, pick_device, plot_losses, user_audio
from model import AudioChatModel, ModelConfig, attend, flex_block_mask, transfusion_mask
from sample import Chat
from diffusion import SAMPLERS, alpha_sigma, cfg, collate, rand, sample_audio, transfusion_forcing_loss
from simulate_data import (AMBIENCES, EDIT_KINDS, MUSIC, SFX, SPLIT_SEEDS, VOICES, DesignerAgent, PlanError, Studio,
                           UserAgent, dialogue_text, dry_signal, make_dialogue, pick, plan_from_text, plan_to_text,
                           plot_story, render, side_of)

# -----------------------------------------------------------------------------
# Part 1: the judge ("FLAM-lite")
#
# The paper scores audio with OpenFLAM, an open-vocabulary frame-wise detector: for a text
# description and an audio clip it gives, every ~0.3 s, the probability that the described sound
# is active. Our world has a closed inventory, so the judge is a closed-set detector with one
# output per sound and per voice, at the codec's 40 Hz frame rate. It is trained like FLAM (one
# independent sigmoid per class and frame, binary cross-entropy, a per-class bias that starts at
# the log-odds of that class's frequency) on scenes the simulator renders, whose labels are exact:
# a source is active on the frames of [start, start + dur). It never sees the AudioChat model.

CLASSES = [*SFX, *AMBIENCES, *MUSIC, *VOICES]   # 14 sounds, 3 ambiences, 2 music beds, 6 voices
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
# the judge's scenes come from their own seed range, disjoint from simulate_data's train (0..),
# val (10M..) and test (20M..) ranges, so the judge never hears a test dialogue
JUDGE_SEEDS = 90_000_000
FRONT_END = AudioCodec()   # the codec's fixed log-mel analysis (encode_raw): all the judge hears


def source_class(src):
    """The judge's class of a plan source: its voice for speech, else its sound name."""
    return src["voice"] if src["type"] == "speech" else src["sound"]


def span_frames(src, T):
    """The frames of a source's span [start, start + dur) at FRAME_RATE, clipped to T. -> slice."""
    a = round(src["start"] * FRAME_RATE)
    return slice(min(a, T), min(round((src["start"] + src["dur"]) * FRAME_RATE), T))


def frame_labels(plan, T):
    """Plan -> (T, C) float32 multi-hot frame labels: class c is on where a source of class c plays."""
    y = torch.zeros(T, len(CLASSES))
    for s in plan["sources"]:
        y[span_frames(s, T), CLASS_INDEX[source_class(s)]] = 1.0
    return y


def _judge_scenes(seed, n_edits=2):
    """Worker: seed -> [(raw log-mel (T, 64) float16, plan)] for a story laid out by the
    simulator's own designer agent and n_edits edited versions of it (single edits of random
    kinds), all rendered with one seed, as in a dialogue, plus one of them through the codec.
    Edited versions teach the judge the scenes it will score: the same sources, louder, softer,
    moved, replaced or gone."""
    rng = np.random.default_rng(seed)
    user, designer, codec = UserAgent(), DesignerAgent(), FRONT_END
    studio, scenes = Studio(seed), []
    for _ in range(100):   # the agents may ask for the impossible (a line that no longer fits): ask again
        if scenes:
            intent = user.edit_intent(studio.plan, rng, pick(rng, [k for k in EDIT_KINDS if k != "multi"]))
        else:
            intent = user.story_intent(rng)
        trial = studio.copy()
        try:
            _, audio = trial.run(designer.respond(studio.plan, intent, rng))
        except PlanError:
            continue
        studio = trial
        scenes.append((codec.encode_raw(audio).half(), studio.plan))
        if len(scenes) == 1 + n_edits:
            break
    # one of them again through the AudioChat codec (log-mel -> Griffin-Lim -> log-mel): the judge
    # must also recognise sounds in a model's decoded audio, which has lost its phase
    raw, plan = scenes[int(rng.integers(len(scenes)))]
    scenes.append((codec.encode_raw(codec.decode_raw(raw.float())).half(), plan))
    return scenes


def simulate_scenes(n_stories, first_seed=JUDGE_SEEDS, workers=None):
    """n_stories simulated stories with their edits (all cores) -> list (per story) of scenes."""
    workers = workers or os.cpu_count()
    with mp.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return pool.map(_judge_scenes, range(first_seed, first_seed + n_stories), chunksize=4)


class Judge(nn.Module):
    """Frame-wise detector: raw log-mel frames (B, T, 64) -> per-frame class logits (B, T, C).

    A stack of residual 1-D convolutions over time with growing dilation (receptive field
    ~1.7 s: enough to tell a dog's two woofs from two knocks, or a voice from its neighbours),
    then a 1x1 convolution to C logits. The frames are standardised with statistics of the
    judge's own training scenes. `embed` pools the last hidden features over time (mean ++ std):
    the clip embedding that KAD compares, as kadtk compares PANNs or CLAP embeddings."""

    def __init__(self, width=96, dilations=(1, 2, 4, 8, 16, 1)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(2 * N_MELS))
        self.register_buffer("std", torch.ones(2 * N_MELS))
        self.inp = nn.Conv1d(2 * N_MELS, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=d, dilation=d) for d in dilations)
        self.head = nn.Conv1d(width, len(CLASSES), 1)

    def features(self, raw):
        """(B, T, 64) raw log-mel -> hidden features (B, width, T)."""
        h = self.inp(((raw - self.mean) / self.std).transpose(1, 2))
        for conv in self.convs:
            h = h + conv(F.gelu(h))
        return F.gelu(h)

    def forward(self, raw):
        return self.head(self.features(raw)).transpose(1, 2)

    @torch.no_grad()
    def probs(self, wav):
        """wav (2, N) -> frame probabilities (T, C) numpy, T = N // HOP; None (no audio) -> None."""
        if wav is None:
            return None
        raw = FRONT_END.encode_raw(wav)[None].to(self.mean.device)
        return torch.sigmoid(self(raw))[0].cpu().numpy()

    @torch.no_grad()
    def embed(self, wav):
        """wav (2, N) -> clip embedding (2 * width,): hidden features, mean ++ std over time."""
        h = self.features(FRONT_END.encode_raw(wav)[None].to(self.mean.device))[0]
        return torch.cat([h.mean(-1), h.std(-1)]).cpu()


def frame_f1(judge, scenes, threshold=0.5):
    """Micro-averaged frame-level F1 over every class and frame of scenes [(raw, plan)]: the
    judge's own held-out quality, reported next to every metric built on it."""
    tp = fp = fn = 0
    with torch.no_grad():
        for raw, plan in scenes:
            pred = torch.sigmoid(judge(raw.float()[None]))[0] >= threshold
            y = frame_labels(plan, raw.shape[0]).bool()
            tp += (pred & y).sum().item()
            fp += (pred & ~y).sum().item()
            fn += (~pred & y).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


def crop_of(raws, labels, crop, g):
    """A random crop of `crop` frames from a random scene, its channels swapped half the time
    (where a sound is does not change what it is). -> (frames (crop, 64), labels (crop, C))."""
    i = int(torch.randint(len(raws), (1,), generator=g))
    a = int(torch.randint(raws[i].shape[0] - crop + 1, (1,), generator=g))
    x = raws[i][a:a + crop]
    if torch.rand(1, generator=g) < 0.5:
        x = torch.cat([x[:, N_MELS:], x[:, :N_MELS]], dim=1)
    return x, labels[i][a:a + crop]


def train_judge(n_stories=500, steps=1500, batch_size=16, crop=160, lr=3e-3, mix_p=0.5, width=96, seed=0, verbose=True):
    """Simulate n_stories stories (4 scenes each), hold out 10 % of them, and train a Judge
    with FLAM's loss (Eq. 4 of the FLAM paper: -log sigmoid(y * logit), y = +-1, i.e. binary
    cross-entropy per class and frame) on random crops of `crop` frames (crop_of). With
    probability mix_p a crop is mixed with a second one: the mel power of independent sounds
    adds, so log-mels mix by logaddexp and labels by max. This makes the overlapping sounds that
    stories are full of (a knock while someone speaks) common instead of rare. -> (judge, info)."""
    t0 = time.time()
    torch.manual_seed(seed)
    stories = simulate_scenes(n_stories)
    n_val = max(1, n_stories // 10)   # held out by story: no edited version of a test scene is trained on
    train = [s for d in stories[n_val:] for s in d]
    val = [s for d in stories[:n_val] for s in d]
    raws = [r.float() for r, _ in train]
    labels = [frame_labels(p, r.shape[0]) for r, p in zip(raws, (p for _, p in train))]
    frames, on = torch.cat(raws), torch.cat(labels)
    judge = Judge(width)
    judge.mean.copy_(frames.mean(0))
    judge.std.copy_(frames.std(0).clamp(min=1e-3))
    prior = on.mean(0).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():   # FLAM's per-class bias starts at log(positive ratio): an untrained judge predicts the prior
        judge.head.bias.copy_(torch.log(prior / (1 - prior)))
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", unit="step", disable=not verbose)
    for step in bar:
        for group in opt.param_groups:   # cosine decay to 10 %
            group["lr"] = lr * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        xs, ys = [], []
        for _ in range(batch_size):
            x, y = crop_of(raws, labels, crop, g)
            if torch.rand(1, generator=g) < mix_p:
                x2, y2 = crop_of(raws, labels, crop, g)
                softer = 6 * float(torch.rand(1, generator=g)) * np.log(10) / 10   # 0..6 dB in log-mel (natural log) units
                x = torch.logaddexp(x, x2 - softer)
                y = torch.maximum(y, y2)
            xs.append(x)
            ys.append(y)
        loss = F.binary_cross_entropy_with_logits(judge(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval()
    info = {"frameF1": 100 * frame_f1(judge, val), "train_s": round(time.time() - t0, 1),
            "scenes": len(train), "heldout_scenes": len(val)}
    return judge, info


def load_or_train_judge(path="out/judge.pt", verbose=True, **train_kwargs):
    """The judge cached at path, or a freshly trained one saved there (atomically: a crash never
    leaves half a file). A cache made for another inventory of sounds and voices is retrained.
    -> Judge (eval mode) with .info = {"frameF1": held-out frame F1 in %, "train_s": seconds, ...}."""
    if os.path.isfile(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["classes"] == CLASSES:
            judge = Judge(**ckpt["args"])
            judge.load_state_dict(ckpt["model"])
            judge.info = ckpt["info"]
            return judge.eval()
        if verbose:
            print(f"{path} was trained for other classes: retraining the judge")
    if verbose:
        print(f"training the judge (FLAM-lite) once; it is cached in {path}")
    judge, info = train_judge(verbose=verbose, **train_kwargs)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    args = {"width": judge.inp.out_channels, "dilations": [c.dilation[0] for c in judge.convs]}
    torch.save({"model": judge.state_dict(), "args": args, "classes": CLASSES, "info": info}, path + ".tmp")
    os.replace(path + ".tmp", path)
    judge.info = info
    return judge


# -----------------------------------------------------------------------------
# Part 2: the metrics
#
# 2a. Built on the judge: multiFLAM, deltaMultiFLAM, editFLAM. The paper computes them with
# OpenFLAM and gives the exact formulas only in its appendix; these follow its words (source
# recall; drift of what should not change; one success rule per edit type) on our judge. A source
# is "detected" when the judge's mean probability for its class over its span reaches 0.5.

DETECTED = 0.5


def span_probability(probs, src):
    """Mean judge probability of src's class over src's span, from probs (T, C); 0 when there is
    no audio (probs None) or the span lies past its end."""
    if probs is None:
        return 0.0
    p = probs[span_frames(src, len(probs)), CLASS_INDEX[source_class(src)]]
    return float(p.mean()) if len(p) else 0.0


def multiflam(judge, wav, plan):
    """multiFLAM (the paper's storytelling metric, higher is better): source recall in %, the
    share of the plan's sources the judge detects in wav (2, N) within their spans. No audio
    (None) scores 0."""
    probs = judge.probs(wav)
    hits = [span_probability(probs, s) >= DETECTED for s in plan["sources"]]
    return 100.0 * sum(hits) / max(1, len(hits))


def untouched(plan_before, plan_after):
    """The sources an edit must leave alone: same id, content, timing, gain and pan in both plans."""
    after = {s["id"]: s for s in plan_after["sources"]}
    return [s for s in plan_before["sources"] if after.get(s["id"]) == s]


def delta_multiflam(judge, wav_before, wav_after, plan_before, plan_after):
    """deltaMultiFLAM (the paper's editing consistency metric, lower is better): the mean absolute
    change, in % points, of the judge's span probability of every source the edit must leave
    alone, from the audio before the edit to the audio after it. Missing audio (None) is silence,
    so an edit that loses the audio counts the full probability of what it lost. None when the
    edit leaves no source alone."""
    keep = untouched(plan_before, plan_after)
    if not keep:
        return None
    pb, pa = judge.probs(wav_before), judge.probs(wav_after)
    return 100.0 * float(np.mean([abs(span_probability(pa, s) - span_probability(pb, s)) for s in keep]))


def content(src):
    """What a source is, as a request names it: type, voice or sound, and the words of a line."""
    return src["type"], source_class(src), src.get("text")


def find_source(plan, like):
    """The source of plan with like's content (the nearest in start time if several), or None.
    Intents name their target by id in the reference plan; a system's plan has its own ids, so
    the target is found by what it is."""
    same = [s for s in plan["sources"] if content(s) == content(like)]
    return min(same, key=lambda s: abs(s["start"] - like["start"]), default=None)


def frame_energy(wav):
    """(2, N) -> mean power of each channel in each codec frame of HOP samples: (2, N // HOP)."""
    T = wav.shape[1] // HOP
    return np.square(wav[:, :T * HOP].astype(np.float64)).reshape(2, T, HOP).mean(-1)


def exposed_frames(src, plan, T):
    """The frames of src's span (within the first T) where the fewest other sources of plan play:
    where a change of src's level or position shows most in the mix (for a bed under a story,
    the pauses between the lines). -> frame indices (n,)."""
    span = np.arange(T)[span_frames(src, T)]
    others = np.zeros(T, np.int64)
    for s in plan["sources"]:
        if s["id"] != src["id"]:
            others[span_frames(s, T)] += 1
    return span[others[span] == others[span].min()] if len(span) else span


def level_db(energy, frames):
    """Loudness of the mix (both channels) over frames, in dB."""
    return 10 * np.log10(energy[:, frames].sum(0).mean() + 1e-12)


def balance_db(energy, frames):
    """Right-minus-left level of the mix over frames, in dB (> 0: to the right)."""
    return 10 * np.log10((energy[1, frames].sum() + 1e-12) / (energy[0, frames].sum() + 1e-12))


def mono_logmel(wav):
    """(2, N) -> (T, 32) log-mel of left + right power: what is heard, wherever it is panned."""
    raw = FRONT_END.encode_raw(wav)
    return torch.logaddexp(raw[:, :N_MELS], raw[:, N_MELS:]).numpy()


def edit_flam(judge, wav_before, wav_after, plan_before, plan_after, intent, reference_plan, seed=0):
    """editFLAM (the paper's editing instruction-following metric, higher is better): 100 if the
    edit the user asked for happened, else 0.

    The request (`intent`, as simulate_data's UserAgent writes it: kind add / remove / change /
    volume / move / multi) names its target by id in the ground-truth plan before the edit
    (`reference_plan`); the target is found in the system's plan_before by content (find_source).
    An op counts only if the system's own plans show it (plan_before -> plan_after, by id) AND
    the audio shows it:
      add     a new id with the asked content, detected in its span after and not before;
      remove  the target's id is gone, and its class is no longer detected in its old span;
      change  same id, the asked new content; the new content is detected in its span after and
              the old one no longer in its old span. When only a line's words change (same
              voice), the judge, which knows voices and not words, cannot tell the lines apart;
              then the line's frames must be closer (mean absolute log-mel difference) to the
              simulator's rendering of plan_after than to its rendering of plan_before, with `seed`;
      volume  the target's gain moved in the asked direction, and the mix's level over the
              target's exposed frames (exposed_frames) moved the same way by >= 1 dB;
      move    the target's pan is now on the asked side (simulate_data.side_of), and the mix's
              right-left balance over its exposed frames moved >= 1 dB that way (toward 0 dB
              for the centre);
      multi   every op succeeds.
    A turn without audio, or without a valid plan before or after, scores 0."""
    if wav_before is None or wav_after is None or plan_before is None or plan_after is None:
        return 0.0
    seen = {"before": judge.probs(wav_before), "after": judge.probs(wav_after)}
    ops = intent["ops"] if intent["edit"] == "multi" else [intent]
    ok = all(_edit_done(op, seen, wav_before, wav_after, plan_before, plan_after, reference_plan, seed) for op in ops)
    return 100.0 * ok


def _edit_done(op, seen, wav_before, wav_after, plan_before, plan_after, reference_plan, seed):
    """One op of edit_flam's rules -> bool."""
    def detected(when, src):
        return span_probability(seen[when], src) >= DETECTED

    if op["edit"] == "add":
        old_ids = {s["id"] for s in plan_before["sources"]}
        new = [s for s in plan_after["sources"] if s["id"] not in old_ids and content(s) == content(op["source"])]
        return any(detected("after", s) and not detected("before", s) for s in new)
    target = find_source(plan_before, next(s for s in reference_plan["sources"] if s["id"] == op["target"]))
    if target is None:
        return False
    now = next((s for s in plan_after["sources"] if s["id"] == target["id"]), None)
    if op["edit"] == "remove":
        return now is None and not detected("after", target)
    if now is None:
        return False
    if op["edit"] == "change":
        if content(now) != content({**target, **op["to"]}):
            return False
        if source_class(now) != source_class(target):
            return detected("after", now) and not detected("after", target)
        heard, *renders = (mono_logmel(w) for w in (wav_after, render(plan_after, seed), render(plan_before, seed)))
        T = min(len(heard), *(len(r) for r in renders))
        frames = np.union1d(*(np.arange(T)[span_frames(s, T)] for s in (target, now)))
        distance = [np.abs(heard[frames] - r[frames]).mean() for r in renders]
        return detected("after", now) and len(frames) > 0 and distance[0] < distance[1]
    T = min(wav_before.shape[1], wav_after.shape[1]) // HOP
    frames = exposed_frames(now, plan_after, T)
    if not len(frames):
        return False
    e_before, e_after = frame_energy(wav_before), frame_energy(wav_after)
    if op["edit"] == "volume":
        sign = 1 if op["direction"] == "up" else -1
        moved = level_db(e_after, frames) - level_db(e_before, frames)
        return sign * (now["gain_db"] - target["gain_db"]) > 0 and sign * moved >= 1.0
    # move
    b_before, b_after = balance_db(e_before, frames), balance_db(e_after, frames)
    sign = {"left": -1, "right": 1}.get(op["where"], -np.sign(b_before))
    return side_of(now["pan"]) == op["where"] and sign * (b_after - b_before) >= 1.0


# 2b. KAD: kernel audio distance (arXiv 2502.15602; kadtk), an unbiased MMD^2 between the judge's
# embeddings of reference audio and of the audio being evaluated.

def median_pairwise_distance(x):
    """x: (N, D) -> the median L2 distance over all pairs: KAD's kernel bandwidth."""
    return torch.pdist(x.double()).median().item()


def kad(reference, evaluated, bandwidth=None, scale=100.0):
    """KAD (lower is better) = 100 x unbiased MMD^2 with the Gaussian kernel
    k(a, b) = exp(-|a - b|^2 / (2 bw^2)):

        KAD = 100 [ sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
                    - 2 sum_{i,j} k(x_i, y_j) / (m n) ]

    reference x: (m, D), evaluated y: (n, D) judge embeddings, m, n >= 2. The bandwidth is the
    median pairwise distance of the REFERENCE set, so the score keeps one meaning when only the
    evaluated set changes (kadtk's README says so; its code takes the evaluated set, and its
    issue #9 shows the rankings that flips). Diagonal terms are left out (unbiased), so two
    samples of one distribution give about 0, possibly slightly negative."""
    x, y = reference.double(), evaluated.double()
    bw = median_pairwise_distance(x) if bandwidth is None else bandwidth
    gamma = 1.0 / (2 * bw ** 2)

    def mean_kernel(a, b, same):
        k = torch.exp(-gamma * torch.cdist(a, b).pow(2))
        if same:
            n = len(a)
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    return scale * (mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)).item()


# 2c. tcpWER: time-constrained minimum-permutation WER, as MeetEval defines it (github.com/fgnt/
# meeteval, doc/tcpwer.md): pseudo word timings from segment timings, a collar on the hypothesis
# only, a Levenshtein distance whose matches and substitutions need overlapping words, and the
# speaker assignment that minimises the total. It judges who said what, and roughly when.

def pseudo_word_timings(segment, points=False):
    """Split a segment (start, end, text) into words with character-based timings: each word gets
    a share of [start, end] proportional to its length (MeetEval's `character_based`); with
    points=True each word is the centre point of its share (`character_based_points`).
    -> list of (word, start, end).

    >>> pseudo_word_timings((0.0, 1.0, "ab abcd ab"))
    [('ab', 0.0, 0.25), ('abcd', 0.25, 0.75), ('ab', 0.75, 1.0)]
    """
    start, end, text = segment
    words = text.split()
    total = sum(len(w) for w in words)
    out, t = [], start
    for w in words:
        t_next = t + (end - start) * len(w) / total
        out.append((w, (t + t_next) / 2, (t + t_next) / 2) if points else (w, t, t_next))
        t = t_next
    return out


def time_constrained_levenshtein(ref, hyp):
    """Edit distance between two word streams [(word, start, end)], where a match or substitution
    is allowed only if the two words' intervals overlap strictly (a.start < b.end and
    a.end > b.start); insertions and deletions always cost 1. -> dict(errors, ins, del, sub)."""
    n, m = len(ref), len(hyp)
    # cell = (errors, ins, dels, subs); each row built from the previous one
    prev = [(j, j, 0, 0) for j in range(m + 1)]
    for i in range(1, n + 1):
        word, rs, re_ = ref[i - 1]
        cur = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            hword, hs, he = hyp[j - 1]
            e, a, d, s = prev[j]
            best = (e + 1, a, d + 1, s)                      # delete ref word i
            e, a, d, s = cur[j - 1]
            if e + 1 < best[0]:
                best = (e + 1, a + 1, d, s)                  # insert hyp word j
            if rs < he and re_ > hs:                         # overlap: diagonal move allowed
                e, a, d, s = prev[j - 1]
                cost = int(word != hword)
                if e + cost < best[0]:
                    best = (e + cost, a, d, s + cost)
            cur.append(best)
        prev = cur
    e, a, d, s = prev[m]
    return {"errors": e, "ins": a, "del": d, "sub": s}


def tcp_wer(reference, hypothesis, collar=5.0):
    """tcpWER (the paper's diarised-transcription metric, lower is better).
    reference, hypothesis: lists of segments (speaker, start, end, text).
    -> dict(errors, length, ins, del, sub, wer, assignment).

    MeetEval's defaults: character-based pseudo word timings for the reference, their centre
    points for the hypothesis, and the collar (s) widens hypothesis words only (5 s, MeetEval's
    recommendation). Each reference speaker is paired with a different hypothesis speaker, or
    with none, so as to minimise the total errors; a reference speaker left unpaired costs all
    its words as deletions, a hypothesis speaker left unpaired all its words as insertions
    (MeetEval pads the cost matrix with empty speakers and runs the Hungarian algorithm; with
    the few speakers of a story, trying every pairing is exact and readable)."""
    def streams(segments, points, pad):
        by_speaker = {}
        for spk, start, end, text in sorted(segments, key=lambda s: s[1]):
            words = pseudo_word_timings((start, end, text), points)
            by_speaker.setdefault(spk, []).extend((w, s - pad, e + pad) for w, s, e in words)
        return by_speaker

    ref = streams(reference, points=False, pad=0.0)
    hyp = streams(hypothesis, points=True, pad=collar)
    ref_spk, hyp_spk = list(ref), list(hyp)
    options = hyp_spk + [None] * len(ref_spk)        # None: paired with nobody
    pair = {(r, h): time_constrained_levenshtein(ref[r], hyp.get(h, [])) for r in ref_spk for h in hyp_spk + [None]}

    def unpaired(chosen):
        return sum(len(hyp[h]) for h in hyp_spk if h not in chosen)

    def total(choice):
        return sum(pair[r, options[c]]["errors"] for r, c in zip(ref_spk, choice)) + unpaired({options[c] for c in choice})

    best = min(itertools.permutations(range(len(options)), len(ref_spk)), key=total)
    assignment = {r: options[c] for r, c in zip(ref_spk, best)}
    stats = {k: sum(pair[r, h][k] for r, h in assignment.items()) for k in ("errors", "ins", "del", "sub")}
    stats["errors"] += unpaired(set(assignment.values()))
    stats["ins"] += unpaired(set(assignment.values()))
    stats["length"] = length = sum(len(ws) for ws in ref.values())
    stats["wer"] = stats["errors"] / length if length else float(stats["errors"] > 0)
    stats["assignment"] = assignment
    return stats


# 2d. Understanding answers and plans: parse what the model wrote, score it against the truth.

TIMED_LINE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*-\s*(\d+(?:\.\d*)?)\s+(.+?)\s*$")


def _timed_lines(text):
    """Lines "{start}-{end} {rest}" with start <= end -> [(start, end, rest)]; other lines are dropped."""
    out = []
    for line in text.splitlines():
        m = TIMED_LINE.match(line)
        if m and float(m[1]) <= float(m[2]):
            out.append((float(m[1]), float(m[2]), m[3]))
    return out


def parse_transcript(text):
    """A transcription answer, one line per utterance "{start:.1f}-{end:.1f} {voice}: {words}"
    (simulate_data.transcript) -> segments [(voice, start, end, words)] for tcp_wer. A line that
    does not parse (no times, no "voice:", end before start, no words) counts as nothing: it adds
    no hypothesis words, so the reference words it may have meant become deletions."""
    segments = []
    for start, end, rest in _timed_lines(text):
        voice, colon, words = rest.partition(":")
        if colon and voice.strip() and " " not in voice.strip() and words.split():
            segments.append((voice.strip(), start, end, " ".join(words.split())))
    return segments


def reference_segments(plan):
    """The true transcript of a scene: its speech sources as tcp_wer segments."""
    return [(s["voice"], s["start"], s["start"] + s["dur"], s["text"]) for s in plan["sources"] if s["type"] == "speech"]


def caption_multiflam(answer_text, true_plan):
    """Caption multiFLAM (the paper's audio-captioning metric, higher is better), on text: recall
    in % of the true scene's sources that the caption names (sound name, or the voice for speech,
    one line each as "{start:.1f}-{end:.1f} {name}", simulate_data.caption) with a time span that
    overlaps the source's span. Each caption line accounts for at most one source; lines that do
    not parse count as nothing. (The paper scores the caption against the audio with OpenFLAM; in
    our closed world a named source and its span are exactly what the judge would look for.)"""
    lines = [(a, b, name) for a, b, name in _timed_lines(answer_text) if " " not in name]
    found = 0
    for s in sorted(true_plan["sources"], key=lambda s: s["start"]):
        a, b = s["start"], s["start"] + s["dur"]
        match = next((line for line in lines if line[2] == source_class(s) and line[0] < b and line[1] > a), None)
        if match:
            lines.remove(match)
            found += 1
    return 100.0 * found / max(1, len(true_plan["sources"]))


PLAN_FAILURES = {   # why a written plan fails, by the words of simulate_data's PlanError (first match)
    "not JSON": "not valid JSON",
    "a voice talks over itself": "talks over",
    "past the story's end": "after the story's end",
    "other": "",
}


def plan_failure(text):
    """A plan text -> None if it parses and passes simulate_data's validation, else the
    PLAN_FAILURES kind of its error."""
    try:
        plan_from_text(text)
        return None
    except PlanError as e:
        return next(kind for kind, words in PLAN_FAILURES.items() if words in str(e))


def plan_validity(texts):
    """Plan validity in %: the share of plan texts that parse and pass simulate_data's validation."""
    return 100.0 * sum(plan_failure(t) is None for t in texts) / max(1, len(texts))


def plan_recall(reference_plan, plan):
    """Plan source recall in %: the share of the requested sources (those of the ground-truth
    plan) that the system's plan names, matched by content (type, voice or sound, words), each
    source of the system's plan used once. An invalid plan (None) recalls nothing."""
    if plan is None:
        return 0.0
    pool = [content(s) for s in plan["sources"]]
    found = 0
    for s in reference_plan["sources"]:
        if content(s) in pool:
            pool.remove(content(s))
            found += 1
    return 100.0 * found / max(1, len(reference_plan["sources"]))


# -----------------------------------------------------------------------------
# Part 3: the systems
#
# StoryGen-Eval-toy is the test split simulate_data.py writes (seeds disjoint from training).
# Each dialogue is one story request, one or two edit requests and one understanding request
# about a fresh scene. Its shards store log-mels, not waveforms, so the ground truth is rendered
# again from its plans: rendering is a pure function of (plan, seed), with the dialogue's seed
# for the story and its edits (simulate_data.make_dialogue) and the scene's own seed for the
# understanding clip.

@dataclass
class Episode:
    """One test dialogue, as the benchmark reads it."""
    seed: int          # the dialogue's render seed
    story: dict        # {"text": the user's request, "intent", "plan": the ground-truth plan}
    edits: list        # the same, for each edit request, in order
    request: str       # the understanding request ("Who says what, and when?", ...)
    task: str          # "transcribe" | "describe"
    scene: dict        # the understanding clip's true plan
    scene_seed: int
    answer: str        # the true answer (simulate_data.transcript or caption of the scene)


def load_episodes(data_dir, n):
    """The first n dialogues of data_dir's test split -> [Episode]."""
    shards = sorted(glob.glob(os.path.join(data_dir, "test_*.pt")))
    if not shards:
        sys.exit(f"error: no test shards in {data_dir!r} (write them with: python simulate_data.py --out {data_dir})")
    texts = []
    for path in shards:
        texts += torch.load(path, weights_only=True)["dialogues"]
        if len(texts) >= n:
            break
    return [episode(json.loads(text)) for text in texts[:n]]


def episode(dialogue):
    """A dialogue as simulate_data.make_dialogue writes it -> Episode."""
    turns = [{"text": u["text"], "intent": u["intent"], "plan": a["plan"]}
             for u, a in zip(dialogue["turns"][::2], dialogue["turns"][1::2])]
    last = turns.pop()
    return Episode(seed=dialogue["seed"], story=turns[0], edits=turns[1:], request=last["text"],
                   task=last["intent"]["task"], scene=last["plan"], scene_seed=last["intent"]["scene_seed"],
                   answer=dialogue["turns"][-1]["text"])


@dataclass
class Reply:
    """One assistant turn of a system: what it wrote (a plan or an answer), the plan if it is
    valid (else None), its audio (2, N) or None, and the wall-clock seconds it took."""
    text: str
    plan: dict = None
    wav: np.ndarray = None
    seconds: float = 0.0


def run_ground_truth(ep):
    """The reference: the dialogue's own plans rendered by the simulator, the true answer.
    -> {"story": Reply, "edits": [Reply], "answer": Reply}."""
    def tools(plan):
        t0 = time.perf_counter()
        wav = render(plan, ep.seed)
        return Reply(plan_to_text(plan), plan, wav, time.perf_counter() - t0)
    return {"story": tools(ep.story["plan"]), "edits": [tools(e["plan"]) for e in ep.edits], "answer": Reply(ep.answer)}


def run_audiochat(model, tok, codec, ep, config):
    """AudioChat-mini in one Chat per dialogue, as the paper's main tables run it: the story from
    the request, each edit conditioned on the model's OWN previous audio (not the ground truth),
    then the understanding request about the (re-rendered) true clip."""
    chat = Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg, seed=ep.seed)

    def timed(fn, *args):
        t0 = time.perf_counter()
        try:
            turn = fn(*args)
        except ValueError as e:   # the dialogue outgrew the model's context: nothing more can be said
            return Reply(f"error: {e}", seconds=time.perf_counter() - t0)
        return Reply(turn.text, turn.plan, turn.wav, time.perf_counter() - t0)

    story = timed(chat.generate, ep.story["text"])
    edits = [timed(chat.edit, e["text"]) for e in ep.edits]
    answer = timed(chat.understand, render(ep.scene, ep.scene_seed), ep.request)
    return {"story": story, "edits": edits, "answer": answer}


def run_cascade(chat_run, ep, context=True):
    """The toy WavJourney: the model's own plans (from the audiochat run), rendered by the
    simulator's tools. With context, one render seed for the whole dialogue, so the sources an
    edit keeps stay sample-identical; without (`cascade_no_context`, the paper's "Cascade (No
    audio context)"), a fresh seed per turn: every turn is synthesised anew. Turns whose plan is
    invalid have no audio. Its seconds time only the rendering (the plans were written, and timed,
    by the audiochat run). The cascade adds no understanding of its own: its answer is left empty."""
    def tools(reply, k):
        if reply.plan is None:
            return Reply(reply.text)
        t0 = time.perf_counter()
        wav = render(reply.plan, ep.seed if context else ep.seed + 1_000_003 * (k + 1))
        return Reply(reply.text, reply.plan, wav, time.perf_counter() - t0)
    return {"story": tools(chat_run["story"], 0), "edits": [tools(r, k + 1) for k, r in enumerate(chat_run["edits"])],
            "answer": None}


def laid_out(reference_plan, plan):
    """The requested scene where the system put it: each source of the reference plan at the span
    the system's plan gives the same content (matched one to one), else at its reference span.
    multiFLAM on this asks whether the audio holds every requested source where the system's own
    plan says, so a different but equally valid timing is not punished, and a source the plan
    forgot is still looked for (where the reference put it)."""
    pool = {"sources": list(plan["sources"]) if plan else []}
    sources = []
    for s in reference_plan["sources"]:
        mine = find_source(pool, s)
        if mine is not None:
            pool["sources"].remove(mine)
        sources.append({**s, "start": mine["start"], "dur": mine["dur"]} if mine else s)
    return {"duration": reference_plan["duration"], "sources": sources}


def embedding(judge, reply, duration):
    """The judge's embedding of a reply's audio; a reply without audio is `duration` s of silence."""
    return judge.embed(reply.wav if reply.wav is not None else np.zeros((2, round(duration * SR)), np.float32))


def score_episode(judge, ep, run):
    """Every per-turn number of one system on one dialogue (and the judge embeddings KAD needs).
    A turn without audio scores 0 on multiFLAM and editFLAM and is silence for KAD; it has no
    deltaMultiFLAM (nothing was kept or lost where nothing was made: a system that makes no
    audio must not look perfectly consistent), so that mean covers the edits with audio on both
    sides, and the table's editFLAM and planValidity show the rest."""
    story = run["story"]
    record = {"story": {"multiFLAM": multiflam(judge, story.wav, laid_out(ep.story["plan"], story.plan)),
                        "planFailure": plan_failure(story.text),
                        "planRecall": plan_recall(ep.story["plan"], story.plan),
                        "seconds": story.seconds, "audio_s": 0.0 if story.wav is None else story.wav.shape[1] / SR,
                        "emb": embedding(judge, story, ep.story["plan"]["duration"])},
              "edits": []}
    before, reference_before = story, ep.story["plan"]
    for request, after in zip(ep.edits, run["edits"]):
        intent = request["intent"]
        heard = before.wav is not None and after.wav is not None   # audio implies a valid plan
        record["edits"].append({
            "kind": intent["edit"],
            "editFLAM": edit_flam(judge, before.wav, after.wav, before.plan, after.plan, intent, reference_before, ep.seed),
            "deltaMultiFLAM": delta_multiflam(judge, before.wav, after.wav, before.plan, after.plan) if heard else None,
            "planFailure": plan_failure(after.text),
            "emb": embedding(judge, after, request["plan"]["duration"])})
        before, reference_before = after, request["plan"]
    answer = run["answer"]
    record["answer"] = {"task": ep.task, "tcp": None, "caption": None}
    if answer is not None and ep.task == "transcribe":
        record["answer"]["tcp"] = tcp_wer(reference_segments(ep.scene), parse_transcript(answer.text))
    elif answer is not None:
        record["answer"]["caption"] = caption_multiflam(answer.text, ep.scene)
    return record


def mean(values):
    """Mean of the values that exist (None = not applicable), or None if none does."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def failure_counts(turns):
    """Scored turns -> {PLAN_FAILURES kind: how many turns' plans failed that way}."""
    return {kind: sum(t["planFailure"] == kind for t in turns) for kind in PLAN_FAILURES}


def valid_share(turns):
    """Scored turns -> planValidity in % (None without turns), from each turn's planFailure."""
    return mean(100.0 * (t["planFailure"] is None) for t in turns)


def aggregate(records, reference):
    """Per-dialogue records of one system (and of the ground truth, the KAD reference; pass
    reference=None for the ground truth itself) -> its eval.json entry, rates in %."""
    stories = [r["story"] for r in records]
    edits = [e for r in records for e in r["edits"]]

    def kad_against(pick):
        if reference is None or len(records) < 2:
            return None
        return kad(torch.stack([x["emb"] for x in pick(reference)]), torch.stack([x["emb"] for x in pick(records)]))

    audio_s = sum(s["audio_s"] for s in stories)
    storytelling = {"multiFLAM": mean(s["multiFLAM"] for s in stories),
                    "KAD": kad_against(lambda rs: [r["story"] for r in rs]),
                    "planValidity": valid_share(stories),
                    "planRecall": mean(s["planRecall"] for s in stories),
                    "planFailures": failure_counts(stories),
                    "latency_s": mean(s["seconds"] for s in stories),
                    "rtf": sum(s["seconds"] for s in stories) / audio_s if audio_s else None}
    editing = {}
    for kind in ("overall", *EDIT_KINDS):
        rows = [e for e in edits if kind in ("overall", e["kind"])]
        editing[kind] = {"editFLAM": mean(e["editFLAM"] for e in rows),
                         "deltaMultiFLAM": mean(e["deltaMultiFLAM"] for e in rows),
                         "planValidity": valid_share(rows), "n": len(rows)}
    editing["overall"]["KAD"] = kad_against(lambda rs: [e for r in rs for e in r["edits"]])
    editing["overall"]["planFailures"] = failure_counts(edits)
    answers = [r["answer"] for r in records]
    tcp = [a["tcp"] for a in answers if a["tcp"] is not None]
    understanding = {
        "tcpWER": 100.0 * sum(t["errors"] for t in tcp) / max(1, sum(t["length"] for t in tcp)) if tcp else None,
        "captionMultiFLAM": mean(a["caption"] for a in answers)}
    return {"storytelling": storytelling, "editing": editing, "understanding": understanding}


# -----------------------------------------------------------------------------
# Part 4: the benchmark -- run every system on the first n test dialogues, tabulate, plot

# What the denoiser knows: one denoising step from a known answer, by noise level (on test
# dialogues simulated afresh, so that their audio is at hand)

def resimulated_test_dialogues(n, tok=None, codec=None, n_fit=48):
    """The first n dialogues of the test split (StoryGen-Eval-toy's seeds), simulated afresh ->
    (episodes, training sequences, tok, codec). Without a checkpoint's tokenizer and codec, a BPE
    and the codec statistics are fit on the first n_fit dialogues of the train split, as
    write_dataset fits them (a BPE fit on the test dialogues themselves would compress them too
    well: their sequences would be shorter than the model ever meets)."""
    if tok is None:
        fit = [make_dialogue(SPLIT_SEEDS["train"] + i) for i in range(n_fit)]
        tok = BPETokenizer()
        tok.train([text for d, _ in fit for text in dialogue_text(d)], vocab_size=1024)
        codec = AudioCodec().fit([FRONT_END.encode_raw(a) for _, clips in fit for a in clips])
    dialogues, audios = zip(*(make_dialogue(SPLIT_SEEDS["test"] + i) for i in range(n)))
    raws = [[FRONT_END.encode_raw(a) for a in clips] for clips in audios]
    seqs = [encode_dialogue(d, [codec.normalize(r) for r in rs], tok) for d, rs in zip(dialogues, raws)]
    return [episode(d) for d in dialogues], seqs, tok, codec


def turn_prefix(seq, span):
    """The part of an encoded dialogue before audio span `span` (its <|audio|> included) ->
    (dict of tokens, audio, span_id, is_plain_text, each (T, ...)), the span's length in tokens)."""
    where = (seq["span_id"] == span).nonzero()[:, 0]
    return {k: seq[k][:int(where[0])] for k in ("tokens", "audio", "span_id", "is_plain_text")}, len(where)


def guidance_rows(prefix, null_id=None):
    """A turn_prefix as model rows -> (tokens (R, T), audio (R, T, latent), span_id (R, T)): R = 1,
    or R = 2 with null_id, the second row holding the prefix with its words replaced by <|null|>
    (batched classifier-free guidance, as in sample.Chat)."""
    tokens = prefix["tokens"][None]
    if null_id is not None:
        tokens = torch.cat([tokens, torch.where(prefix["is_plain_text"], null_id, prefix["tokens"])[None]])
    R = len(tokens)
    return tokens, prefix["audio"][None].expand(R, -1, -1), prefix["span_id"][None].expand(R, -1)


def recompute_denoiser(model, prefix, n_tokens, null_id=None):
    """The denoiser of the n_tokens audio span that follows `prefix`, without any cache: every call
    runs forward() over the whole sequence, prefix and span -> v_fn(x (1, n_tokens, latent), t (1,))
    -> v (R, n_tokens, latent) float, one row per guidance_rows row (all denoise the same x)."""
    dev = model.wte.weight.device
    tokens, audio, span_id = guidance_rows(prefix, null_id)
    R, T = tokens.shape
    tokens = torch.cat([tokens, tokens.new_zeros(R, n_tokens)], 1).to(dev)
    span_id = torch.cat([span_id, span_id.new_full((R, n_tokens), int(span_id.max()) + 1)], 1).to(dev)
    audio = audio.to(dev)

    def v_fn(x, t):
        x_all = torch.cat([audio, x.to(dev).expand(R, -1, -1)], 1)
        t_all = torch.cat([torch.zeros(R, T, device=dev), t.to(dev)[:, None].expand(R, n_tokens)], 1)
        return model(tokens, x_all, t_all, span_id)[1][:, T:].float()
    return v_fn


PROFILE_T = (0.3, 0.6, 0.9, 1.0)


@torch.no_grad()
def denoiser_profile(model, tok, codec, judge, n=8, ts=PROFILE_T, seed=0):
    """Teacher-forced on the story turn of the first n test dialogues, the ground-truth plan in
    context: noise the true audio x0 to level t, take the model's one-step estimate
    x0_hat = alpha x_t - sigma v, and report its error MSE / var(x0) per t (0 = exact; 1 = the
    clip's mean spectrum) and, at t = 1 (pure noise: only the plan to go on), the multiFLAM of
    x0_hat decoded. The simulator makes the audio nearly a function of the plan, so a model that
    has learned the world scores low errors even at t = 1. The reference is the same plan
    rendered with another seed: the part of the audio the plan does not fix.
    -> {"n", "x0_error": {t: mean}, "multiFLAM_t1": mean, "seed_error": mean, "seed_multiFLAM": mean}."""
    episodes, seqs, _, _ = resimulated_test_dialogues(n, tok, codec)
    g = torch.Generator().manual_seed(seed)
    errors, scores, seed_errors, seed_scores = {t: [] for t in ts}, [], [], []
    for ep, seq in zip(episodes, seqs):
        prefix, n_tokens = turn_prefix(seq, 0)
        x0 = seq["audio"][seq["span_id"] == 0][None]                                   # (1, N, latent)
        denoise = recompute_denoiser(model, prefix, n_tokens)
        estimates = {}
        for t in (*ts, 1.0):
            alpha, sigma = alpha_sigma(torch.tensor(t))
            x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=g)
            estimates[t] = alpha * x_t - sigma * denoise(x_t, torch.tensor([t])).cpu()
        for t in ts:
            errors[t].append(float((estimates[t] - x0).pow(2).mean() / x0.var()))
        wav = codec.decode(AudioCodec.unpatchify(estimates[1.0][0])).numpy()
        scores.append(multiflam(judge, wav, ep.story["plan"]))
        other = AudioCodec.patchify(codec.normalize(FRONT_END.encode_raw(render(ep.story["plan"], ep.seed + 1))))
        seed_errors.append(float((other - x0[0]).pow(2).mean() / x0.var()))
        seed_scores.append(multiflam(judge, codec.decode(AudioCodec.unpatchify(other)).numpy(), ep.story["plan"]))
    return {"n": len(episodes), "x0_error": {t: mean(e) for t, e in errors.items()}, "multiFLAM_t1": mean(scores),
            "seed_error": mean(seed_errors), "seed_multiFLAM": mean(seed_scores)}


# Does the model listen? The true answer's cross-entropy with the user's clip, and without it

def answer_positions(seq):
    """(L - 1,) bool: the positions i whose next token, tokens[i + 1], belongs to the assistant's
    answer about the user's clip (the clip comes last in a dialogue, simulate_data.make_dialogue)."""
    after_clip = torch.arange(len(seq["span_id"]) - 1) > int(user_audio(seq).nonzero()[-1])
    return seq["text_target"][:-1] & after_clip


@torch.no_grad()
def listening_profile(model, tok, codec, n=20):
    """Teacher-forced on the understanding turn of the first n test dialogues: the mean
    cross-entropy (nats per token) of the true answer with the clip in context, and with the clip
    replaced by the average sound (zeros: the mean of the normalised latents). A model that listens
    is much surer with the clip; equal numbers mean its answers come from the request alone.
    -> {task: {"n", "ce_clip", "ce_without_clip"}} for each task (transcribe, describe)."""
    episodes, seqs, _, _ = resimulated_test_dialogues(n, tok, codec)
    dev = model.wte.weight.device
    ces = {}
    for ep, seq in zip(episodes, seqs):
        where = answer_positions(seq).to(dev)
        tokens, span, targets = seq["tokens"][None].to(dev), seq["span_id"][None].to(dev), seq["tokens"][1:].to(dev)[where]
        row = ces.setdefault(ep.task, {"ce_clip": [], "ce_without_clip": []})
        for key, audio in (("ce_clip", seq["audio"]), ("ce_without_clip", seq["audio"] * ~user_audio(seq)[:, None])):
            logits = model(tokens, audio[None].to(dev), torch.zeros(span.shape, device=dev), span)[0][0, :-1]
            row[key].append(float(F.cross_entropy(logits[where].float(), targets)))
    return {task: {"n": len(row["ce_clip"]), **{k: mean(v) for k, v in row.items()}} for task, row in ces.items()}


@dataclass
class EvalConfig:
    ckpt: list = opt(None, "checkpoint written by train.py (required); repeat --ckpt to add others, e.g. --arch=dense")
    n: int = opt(60, "test dialogues: the first n of StoryGen-Eval-toy (on 20, plan validity moves by ~10 points with the draw)")
    data_dir: str = opt("data", "dataset written by simulate_data.py (its test split is read)")
    out_dir: str = opt("out", "where eval.json, eval.png and the cached judge.pt go")
    sampler: str = opt("dpmpp", "dpmpp (DPM-Solver++(2M), Karras) | ddim")
    steps: int = opt(25, "diffusion steps per audio span")
    cfg: float = opt(3.0, "classifier-free guidance scale (1 = none)")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    report_n: int = opt(4, "dialogues shown turn by turn in OUT_DIR/report.html (0 = no report)")
    bench: bool = opt(False, "instead of evaluating, time the model's parts (Part 6): tables + OUT_DIR/bench.json; uses the first --ckpt if any")


def system_names(paths, archs):
    """The first checkpoint is `audiochat`; each other one `audiochat_<arch>`, or
    `audiochat_<its out dir>` when that name is taken or the arch is the first one's (a second
    SCT is another run, not the SCT)."""
    names = ["audiochat"]
    for path, arch in zip(paths[1:], archs[1:]):
        name = f"audiochat_{arch}"
        if name in names or arch == archs[0]:
            name = f"audiochat_{os.path.basename(os.path.dirname(os.path.abspath(path)))}"
        names.append(name)
    return names


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def result_tables(results):
    """The paper's tables from eval.json's "systems" -> [(title, header, rows of cells)]."""
    systems = results["systems"]
    story = [[name, fmt(s["multiFLAM"]), fmt(s["KAD"], 2), fmt(s["planValidity"]), fmt(s["planRecall"]),
              fmt(s["latency_s"], 2), fmt(s["rtf"], 2)] for name, s in ((k, r["storytelling"]) for k, r in systems.items())]
    edit = [[name, fmt(e["KAD"], 2), fmt(e["deltaMultiFLAM"]), fmt(e["editFLAM"]), fmt(e["planValidity"])]
            for name, e in ((k, r["editing"]["overall"]) for k, r in systems.items())]
    per_task = [[name] + [f"{fmt(r['editing'][k]['editFLAM'])} / {fmt(r['editing'][k]['deltaMultiFLAM'])}" for k in EDIT_KINDS]
                for name, r in systems.items()]
    counts = next(iter(systems.values()))["editing"]
    understand = [[name, fmt(r["understanding"]["tcpWER"]), fmt(r["understanding"]["captionMultiFLAM"])]
                  for name, r in systems.items()]
    return [(f"Storytelling (paper Table 2), {results['n']} dialogues",
             ["system", "multiFLAM ↑", "KAD ↓", "planValidity ↑", "planRecall ↑", "latency_s ↓", "rtf ↓"], story),
            ("Editing (paper Table 1)", ["system", "KAD ↓", "deltaMultiFLAM ↓", "editFLAM ↑", "planValidity ↑"], edit),
            ("Editing per sub-task: editFLAM ↑ / deltaMultiFLAM ↓",
             ["system"] + [f"{k} (n={counts[k]['n']})" for k in EDIT_KINDS], per_task),
            ("Understanding (paper Table 3)", ["system", "tcpWER ↓", "captionMultiFLAM ↑"], understand),
            *failure_table(results), *denoiser_table(results), *listening_table(results)]


def failure_table(results):
    """Why the models' plans fail: story / edit turns per PLAN_FAILURES kind -> [(title, header, rows)].
    The ground truth's plans never fail and the cascades render the models' plans, so only models show."""
    systems = {k: r for k, r in results["systems"].items() if not k.startswith(("ground_truth", "cascade"))}
    rows = [[name, *[f"{r['storytelling']['planFailures'][k]} / {r['editing']['overall']['planFailures'][k]}"
                     for k in PLAN_FAILURES]] for name, r in systems.items()]
    return [(f"Why plans fail: story / edit turns whose plan failed that way (of {results['n']} stories, "
             f"{next(iter(results['systems'].values()))['editing']['overall']['n']} edits)",
             ["system", *PLAN_FAILURES], rows)] if rows else []


def denoiser_table(results):
    """eval.json's "denoiser" (denoiser_profile per model) -> [(title, header, rows)], or []."""
    profiles = results.get("denoiser")
    if not profiles:
        return []
    ts = list(next(iter(profiles.values()))["x0_error"])
    seed = next(iter(profiles.values()))
    rows = [["the same plan, another render seed", *[fmt(seed["seed_error"], 2)] * len(ts), fmt(seed["seed_multiFLAM"])]]
    rows += [[name, *[fmt(p["x0_error"][t], 2) for t in ts], fmt(p["multiFLAM_t1"])] for name, p in profiles.items()]
    return [(f"What the denoiser knows: one step from the true story audio, ground-truth plan in context, "
             f"{seed['n']} dialogues (x0 error = MSE / variance; 1 = the clip's mean spectrum)",
             ["estimate", *[f"x0 error at t = {float(t):g} ↓" for t in ts], "multiFLAM of the t = 1 estimate ↑"], rows)]


def listening_table(results):
    """eval.json's "listening" (listening_profile per model) -> [(title, header, rows)], or []."""
    profiles = results.get("listening")
    if not profiles:
        return []
    tasks = [t for t in ("transcribe", "describe") if t in next(iter(profiles.values()))]
    rows = [[name, *[f"{fmt(p[t]['ce_clip'], 3)} / {fmt(p[t]['ce_without_clip'], 3)}" for t in tasks]]
            for name, p in profiles.items()]
    counts = next(iter(profiles.values()))
    return [("Does the model listen? Cross-entropy of the true answer (nats per token), with the clip / "
             "with the clip replaced by the average sound: equal = the answer ignores the audio",
             ["system", *[f"{t} (n={counts[t]['n']})" for t in tasks]], rows)]


def table_note(results):
    return (f"Rates in %. Judge (FLAM-lite) held-out frame F1: {results['judge']['frameF1']:.1f} %. KAD against "
            "the ground truth's audio (judge embeddings). Ground-truth and cascade latency time only the simulator's "
            "rendering; the cascades reuse audiochat's plans and answer no understanding requests (–).")


def markdown(title, header, rows):
    """A titled markdown table: header (column names), rows (lists of cells) -> lines."""
    return (["", f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def tables(results):
    """The paper's tables as markdown."""
    lines = [line for table in result_tables(results) for line in markdown(*table)]
    return "\n".join(lines[1:] + ["", table_note(results)])


def plot(results, path):
    """A bar chart per main metric, one bar per system."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("storytelling", "multiFLAM", "story multiFLAM ↑"), ("storytelling", "KAD", "story KAD ↓"),
              ("editing", "editFLAM", "editFLAM ↑"), ("editing", "deltaMultiFLAM", "deltaMultiFLAM ↓"),
              ("understanding", "tcpWER", "tcpWER ↓"), ("understanding", "captionMultiFLAM", "caption multiFLAM ↑")]
    names = list(results["systems"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (section, key, title) in zip(axes.flat, panels):
        values = []
        for name in names:
            entry = results["systems"][name][section]
            values.append((entry["overall"] if section == "editing" else entry)[key])
        ax.bar(range(len(names)), [0 if v is None else v for v in values], color=[f"C{i}" for i in range(len(names))])
        for i, v in enumerate(values):
            ax.text(i, 0 if v is None else v, fmt(v, 2 if key == "KAD" else 1), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Part 5: the report -- one page for the projector
#
# out/report.html shows a few test dialogues turn by turn: the user's words, then for the ground
# truth, AudioChat-mini and the cascade side by side the plan, a player and the spectrogram with
# the plan's timeline; then the results tables, eval.png and the loss curves. It needs no server:
# the wavs and pictures it plays and shows are written beside it, in out/report/.

REPORT_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1500px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table.results { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.95em; }
table.results th, table.results td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
table.results td:first-child, table.results th:first-child { text-align: left; }
.user { background: #eef4ff; border-left: 4px solid #4a7bd0; padding: 0.5em 0.8em; margin: 1em 0 0.5em; }
.turn { display: grid; grid-template-columns: repeat(3, 1fr); gap: 1em; }
.system { background: #fafafa; border: 1px solid #e2e2e2; border-radius: 6px; padding: 0.6em; min-width: 0; }
.system h4 { margin: 0 0 0.4em; } .system img { width: 100%; } .system audio { width: 100%; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 0.78em; background: #fff; padding: 0.4em; margin: 0.3em 0; }
.error { color: #b00; font-size: 0.9em; } .note { color: #555; font-size: 0.9em; }
"""


def html_table(header, rows):
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="results"><tr>{head}</tr>{body}</table>'


def report_cell(title, reply, media_dir, stem):
    """One system's answer to one turn: its plan (or answer), a player and the picture (files
    written into media_dir) -> an HTML fragment."""
    import soundfile as sf
    parts = [f'<div class="system"><h4>{escape(title)}</h4>']
    if reply is None:
        return parts[0] + '<p class="note">(no answer: this system does not understand audio)</p></div>'
    if reply.plan is not None:
        parts.append(f"<pre>{escape(plan_to_text(reply.plan))}</pre>")
    else:
        parts.append(f"<pre>{escape(reply.text)}</pre>")
        if reply.wav is None and reply.text.lstrip().startswith("{"):
            parts.append('<p class="error">the plan is not valid: no audio</p>')
    if reply.wav is not None:
        sf.write(os.path.join(media_dir, stem + ".wav"), reply.wav.T, SR, subtype="PCM_16")
        plot_story(reply.wav, reply.plan, os.path.join(media_dir, stem + ".png"))
        base = os.path.basename(media_dir)
        parts.append(f'<audio controls preload="none" src="{base}/{stem}.wav"></audio>'
                     f'<img loading="lazy" src="{base}/{stem}.png" alt="spectrogram and plan timeline">')
    return "".join(parts) + "</div>"


def write_report(results, showcase, ckpt_paths, out_dir):
    """out_dir/report.html (+ out_dir/report/): showcase is [(Episode, {system: run})] with the runs
    of ground_truth, audiochat and cascade."""
    media = os.path.join(out_dir, "report")
    os.makedirs(media, exist_ok=True)
    html = [f"<!doctype html><html><head><meta charset='utf-8'><title>AudioChat-mini: StoryGen-Eval-toy report</title>"
            f"<style>{REPORT_CSS}</style></head><body>",
            "<h1>AudioChat-mini on StoryGen-Eval-toy</h1>",
            f"<p class='note'>{results['n']} test dialogues; checkpoint(s): {escape(', '.join(ckpt_paths))}. "
            "Each dialogue: a story, one or two edits (each conditioned on the system's own previous audio), "
            "and an understanding request about a fresh clip. Click a player to listen.</p>",
            "<h2>Results</h2>"]
    for title, header, rows in result_tables(results):
        html += [f"<h3>{escape(title)}</h3>", html_table(header, rows)]
    html += [f"<p class='note'>{escape(table_note(results))}</p>", '<img src="eval.png" style="max-width:100%">']
    curves = []
    for k, path in enumerate(ckpt_paths):
        log = os.path.join(os.path.dirname(os.path.abspath(path)), "log.csv")
        if os.path.exists(log):
            plot_losses(log, os.path.join(media, f"loss_{k}.png"))
            curves.append(f"<h3>{escape(path)}</h3><img src='report/loss_{k}.png' style='max-width:100%'>")
    if curves:
        html += ["<h2>Training curves</h2>"] + curves
    systems = [("ground_truth", "ground truth (simulator)"), ("audiochat", "AudioChat-mini"),
               ("cascade", "cascade (model's plan, simulator's tools)")]
    for d, (ep, runs) in enumerate(showcase):
        html.append(f"<h2>Dialogue {d + 1} (seed {ep.seed})</h2>")
        requests = [("story", ep.story["text"])] + [(f"edit {k + 1}", e["text"]) for k, e in enumerate(ep.edits)]
        for k, (what, words) in enumerate(requests):
            html.append(f"<div class='user'><b>user ({what}):</b> {escape(words)}</div><div class='turn'>")
            for name, title in systems:
                reply = runs[name]["story"] if k == 0 else runs[name]["edits"][k - 1]
                html.append(report_cell(title, reply, media, f"d{d}_t{k}_{name}"))
            html.append("</div>")
        clip = Reply(ep.request, ep.scene, render(ep.scene, ep.scene_seed))
        html.append(f"<div class='user'><b>user (understanding):</b> {escape(ep.request)}</div><div class='turn'>")
        html.append(report_cell("the clip (and its true plan)", clip, media, f"d{d}_clip"))
        for name, title in systems[:2]:
            answer = runs[name]["answer"]
            html.append(f"<div class='system'><h4>{escape(title)}</h4><pre>{escape(answer.text)}</pre></div>")
        html.append("</div>")
    html.append("</body></html>")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(html))
    return path


def evaluate(config):
    """Run every system on the first config.n test dialogues; print the tables; write eval.json
    and eval.png into config.out_dir. -> the eval.json dict."""
    episodes = load_episodes(config.data_dir, config.n)
    judge = load_or_train_judge(os.path.join(config.out_dir, "judge.pt"))
    print(f"judge (FLAM-lite): held-out frame F1 {judge.info['frameF1']:.1f} %")
    device = pick_device(config.device)
    models = [load_checkpoint(path, device) for path in config.ckpt]
    names = system_names(config.ckpt, [ckpt["model_args"]["arch"] for *_, ckpt in models])
    records = {name: [] for name in ["ground_truth", names[0], "cascade", "cascade_no_context", *names[1:]]}
    showcase = []   # the first report_n dialogues' runs, for report.html
    for i, ep in enumerate(tqdm(episodes, desc="eval", unit="dialogue")):
        runs = {"ground_truth": run_ground_truth(ep)}
        for k, (name, (model, tok, codec, _)) in enumerate(zip(names, models)):
            runs[name] = run_audiochat(model, tok, codec, ep, config)
            if k == 0:   # the cascades render the first model's plans
                runs["cascade"] = run_cascade(runs[name], ep)
                runs["cascade_no_context"] = run_cascade(runs[name], ep, context=False)
        for name, run in runs.items():
            records[name].append(score_episode(judge, ep, run))
        if i < config.report_n:
            showcase.append((ep, runs))
    reference = records["ground_truth"]
    results = {"judge": {"frameF1": judge.info["frameF1"]}, "n": len(episodes),
               "systems": {name: aggregate(rs, None if name == "ground_truth" else reference) for name, rs in records.items()},
               "denoiser": {name: denoiser_profile(model, tok, codec, judge, n=min(config.n, 8))
                            for name, (model, tok, codec, _) in zip(names, models)},
               "listening": {name: listening_profile(model, tok, codec, n=config.n)
                             for name, (model, tok, codec, _) in zip(names, models)}}
    print(tables(results))
    os.makedirs(config.out_dir, exist_ok=True)
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(config.out_dir, "eval.png"))
    written = "eval.png"
    if showcase:
        write_report(results, showcase, config.ckpt, config.out_dir)
        written += ", report.html (+ report/)"
    print(f"wrote {os.path.join(config.out_dir, 'eval.json')}, {written}")
    return results


# -----------------------------------------------------------------------------
# Part 6: speed benchmarks (python eval.py --bench)
#
# How fast each piece is on the current device, all measured in one run: every comparison is a
# ratio of two timings taken side by side, never a number carried over from another machine.
#   6a. the three attention backends (math, sdpa, flex) on packed rows of growing length;
#   6b. a training step, against a plain causal language model of the same size (MFU on CUDA);
#   6c. greedy text decoding with and without the KV cache;
#   6d. sampling one audio span with and without the prefix cache;
#   6e. DPM-Solver++ against DDIM-150 at equal quality (needs --ckpt; scored by the judge);
#   6f. end-to-end latency of a story and its real-time factor, next to the simulator's render.
# The inputs are the first dialogues of the test split, simulated and encoded as in training,
# so span layouts and lengths are the ones the model meets. Without --ckpt the model is a
# randomly initialised one of the size train.py trains here: speed does not depend on weights.
# Tables are printed as each section ends, and OUT_DIR/bench.json holds every number. No test
# asserts a timing; the tests check the machinery and that cached and uncached paths agree.

@dataclass
class BenchSizes:
    """How much each section measures: BenchSizes() is `--bench`; the test suite uses QUICK_BENCH."""
    attn_lengths: tuple = (256, 512, 1024, 2048, 4096)  # tokens per packed row (batch 1)
    math_max_len_cpu: int = 2048     # math materialises (H, L, L) scores and their gradient: skipped above on CPU
    repeats: int = 3                 # timed calls per figure (the median is reported), after one warm-up
    dialogues: int = 16              # test-split dialogues simulated as the bench's inputs
    fit_dialogues: int = 48          # train-split dialogues the BPE and codec statistics are fit on (no --ckpt)
    model: dict = None               # overrides of the preset's sizes (TrainConfig fields)
    decode_tokens: int = 100         # tokens decoded per run in 6c
    cache_turns: int = 3             # audio turns of one dialogue in 6d: the story, then its edits
    sampler_episodes: int = 4        # stories scored per sampler in 6e
    dpm_steps: tuple = (10, 15, 25, 50)
    ddim_steps: int = 150
    stories: int = 3                 # stories timed end to end in 6f


QUICK_BENCH = BenchSizes(attn_lengths=(128, 256), repeats=1, dialogues=3, fit_dialogues=3, decode_tokens=6, cache_turns=2,
                         sampler_episodes=2, dpm_steps=(2, 3), ddim_steps=4, stories=1,
                         model=dict(n_layer=2, n_gen_layer=1, n_head=2, n_embd=32, batch_size=1))


def synchronize(device):
    """Wait for the device's queued work: CUDA and MPS run asynchronously to Python."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def median_time(fn, device, repeats=3, warmup=1):
    """Median wall-clock seconds of fn() over `repeats` calls, after `warmup` untimed calls that
    absorb one-off costs (compilation, allocator growth). The device is synchronised before each
    clock read, so queued GPU work is counted, not just its launch."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return "Apple GPU (mps)" if device == "mps" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def preset_config(vocab_size, overrides=None):
    """The sizes train.py trains on this machine (its preset: cpu, or gpu under CUDA), with
    `overrides` of TrainConfig fields. -> (ModelConfig, TrainConfig)."""
    config = parse_config(TrainConfig, [], PRESETS)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    sizes = {f.name: getattr(config, f.name) for f in fields(ModelConfig) if hasattr(config, f.name)}
    return ModelConfig(vocab_size=vocab_size, latent_dim=LATENT_DIM, **sizes), config


# 6a. the attention backends

def packed_row(seqs, length, device):
    """span_id, doc_id (1, length) of one training row packed with whole dialogues, cut at length."""
    row, n = [], 0
    for seq in itertools.cycle(seqs):
        row.append(seq)
        n += len(seq["tokens"])
        if n >= length:
            break
    batch = collate([row], pad_id=0)
    return batch["span_id"][:, :length].to(device), batch["doc_id"][:, :length].to(device)


def bench_attention(seqs, model_config, lengths, device, repeats, math_max_len_cpu):
    """Forward and forward+backward time of model.attend with each backend, one row of `lengths`
    tokens packed with dialogues (batch 1, the model's heads and width; bf16 on CUDA). The mask is
    built once per training step and shared by every layer, so it is built outside the timing.
    FlexAttention has no backward off CUDA: there only its forward is timed."""
    H, hd = model_config.n_head, model_config.n_embd // model_config.n_head
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for L in lengths:
        span_id, doc_id = packed_row(seqs, L, device)
        dense = transfusion_mask(span_id, doc_id)
        masks = {"math": dense, "sdpa": dense, "flex": flex_block_mask(span_id, doc_id)}
        q, k, v = (torch.randn(1, H, L, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        row = {"tokens": L, "mask_density": dense.float().mean().item(), "flex_blocks_skipped": masks["flex"].sparsity() / 100}
        for backend, mask in masks.items():
            if backend == "math" and device == "cpu" and L > math_max_len_cpu:
                row[backend] = {"fwd_ms": None, "fwd_bwd_ms": None}
                continue

            def forward():   # detached: flex refuses inputs that require grad where it has no backward
                with torch.no_grad():
                    attend(q.detach(), k.detach(), v.detach(), mask, backend)

            def forward_backward():
                attend(q, k, v, mask, backend).sum().backward()
                q.grad = k.grad = v.grad = None

            with warnings.catch_warnings():   # eager flex off CUDA warns that it is unfused: we know
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
                fwd = median_time(forward, device, repeats)
                can_backward = backend != "flex" or device.startswith("cuda")
                fwd_bwd = median_time(forward_backward, device, repeats) if can_backward else None
            row[backend] = {"fwd_ms": 1000 * fwd, "fwd_bwd_ms": None if fwd_bwd is None else 1000 * fwd_bwd}
        rows.append(row)
    def ms(x):
        return "n/a" if x is None else f"{x:.1f}"
    print("\n".join(markdown(f"6a. Attention backends: forward+backward (forward) ms, batch 1, {H} heads of {hd}, {dtype}",
                             ["tokens", "mask density", "flex blocks skipped", "math", "sdpa", "flex"],
                             [[str(r["tokens"]), f"{r['mask_density']:.2f}", f"{r['flex_blocks_skipped']:.2f}"]
                              + [f"{ms(r[b]['fwd_bwd_ms'])} ({ms(r[b]['fwd_ms'])})" for b in ("math", "sdpa", "flex")]
                              for r in rows])))
    note = ("Rows are packed test dialogues (text runs between audio spans of 80-120 tokens), documents kept apart: "
            "the longer the row, the less of it any token may see. Mask density: the share of allowed query-key pairs; "
            "flex blocks skipped: the share of 128 x 128 blocks FlexAttention never computes. "
            "flex runs compiled on CUDA, eagerly (unfused) elsewhere.")
    if not device.startswith("cuda"):
        note += " PyTorch has no FlexAttention backward off CUDA: flex forward+backward is n/a here."
    if device == "cpu" and max(lengths) > math_max_len_cpu:
        note += f" math is skipped above {math_max_len_cpu} tokens on CPU: its (H, L, L) scores, mask and gradients take over a GB and seconds per call."
    print(note)
    return {"rows": rows, "dtype": str(dtype), "n_head": H, "head_dim": hd, "note": note}


# 6b. training throughput

def causal_lm_loss(model, tokens):
    """The baseline of 6b: a plain GPT on the same weights and layers. Token + position
    embeddings, every block under the causal mask only (no audio spans, no documents), the text
    head on top, cross-entropy on every next token; no noise levels, no diffusion head, no MSE,
    no token shift."""
    L = tokens.size(1)
    backend = model.backend
    no_spans = torch.full_like(tokens, -1)   # with no audio span the Transfusion rule is the causal mask
    mask = flex_block_mask(no_spans) if backend == "flex" else transfusion_mask(no_spans)
    pos = torch.arange(L, device=tokens.device)
    x = model.wte(tokens) + (model.wpe(pos) if model.wpe is not None else 0)
    rope = model.rope(pos)
    for block in model.blocks:
        x, _ = block(x, mask, backend, rope=rope)
    logits = model.text_head(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


# dense bf16 tensor-core peak of one GPU, from the vendors' data sheets (without sparsity)
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device):
    """The device's bf16 peak in FLOP/s, or None (not CUDA, or a GPU missing from the table)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model, T):
    """nanoGPT's estimate_mfu (PaLM, appendix B): 6 N for the weights' matmuls forward and
    backward, plus 12 L H Q T for attention; N parameters (no position table), L layers, H heads
    of size Q, T tokens of context."""
    c = model.config
    return 6 * model.num_params() + 12 * len(model.blocks) * c.n_head * (c.n_embd // c.n_head) * T


def bench_training(seqs, tok, device, repeats, overrides=None):
    """Tokens per second of one training step (forward, backward, AdamW) of AudioChat-mini, with
    transfusion_forcing_loss on a batch packed from dialogues as train.py packs it, against the
    same model trained as a plain causal LM (causal_lm_loss) on the same tokens. bf16 autocast on
    CUDA, as train.py. Model and batch sizes are train.py's preset for this machine."""
    model_config, config = preset_config(tok.vocab_size, overrides)
    torch.manual_seed(0)
    model = AudioChatModel(model_config).to(device)
    rows = pack(seqs, config.block_size, config.seed)   # the fullest rows: a full dataset packs them tight
    rows = sorted(rows, key=lambda r: -sum(len(seqs[i]["tokens"]) for i in r))
    rows = [rows[i % len(rows)] for i in range(config.batch_size)]
    batch = {k: v.to(device) for k, v in collate([[seqs[i] for i in r] for r in rows], tok.special("<|pad|>")).items()}
    n_tokens = int((~batch["is_pad"]).sum())
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (0.9, 0.95), device.split(":")[0])
    autocast = autocast_for(device)
    g = torch.Generator().manual_seed(0)
    losses = {"audiochat": lambda: transfusion_forcing_loss(model, batch, tok.special("<|null|>"), generator=g)[0],
              "causal_lm": lambda: causal_lm_loss(model, batch["tokens"])}

    def step(loss_fn):
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    B, L = batch["tokens"].shape
    out = {"batch": B, "seq_len": L, "tokens_per_step": n_tokens, "params_M": model.num_params() / 1e6,
           "n_layer": len(model.blocks), "n_embd": model.config.n_embd, "attn": model.backend}
    peak = peak_flops(device)
    for name, loss_fn in losses.items():
        tps = n_tokens / median_time(lambda: step(loss_fn), device, repeats)
        out[name] = {"tokens_per_s": tps, "mfu": None if peak is None else flops_per_token(model, L) * tps / peak}
    out["slowdown"] = out["causal_lm"]["tokens_per_s"] / out["audiochat"]["tokens_per_s"]
    print("\n".join(markdown(f"6b. Training throughput: {B} x {L} tokens ({n_tokens} not padding), {out['params_M']:.2f}M "
                             f"parameters, {out['n_layer']} layers of {out['n_embd']}, {out['attn']} attention",
                             ["model", "tokens/s", "MFU", "time vs causal LM"],
                             [[name, f"{out[name]['tokens_per_s']:.0f}",
                               "n/a" if out[name]["mfu"] is None else f"{100 * out[name]['mfu']:.1f} %",
                               f"{out['causal_lm']['tokens_per_s'] / out[name]['tokens_per_s']:.2f}x"] for name in losses])))
    print("causal_lm: the same layers as a text-only GPT (causal mask only, cross-entropy only). MFU (CUDA only): "
          "nanoGPT's 6N + 12 L H Q T FLOPs per token against the GPU's dense bf16 peak.")
    return out


# 6c. text decoding with and without the KV cache

@torch.no_grad()
def greedy_decode(model, prompt, n, cached=True):
    """Exactly n greedily decoded text tokens after `prompt` (a list of ids) -> list of n ids.
    cached: the prompt once, then one token per step through the KV cache (model.extend, SCT's
    U understanding layers only). Otherwise forward() re-runs the whole growing sequence per token."""
    dev, latent = model.wte.weight.device, model.config.latent_dim

    def text(ids):
        L = len(ids)
        return (torch.tensor([ids], device=dev), torch.zeros(1, L, latent, device=dev), torch.zeros(1, L, device=dev),
                torch.full((1, L), -1, device=dev))

    out = []
    if not cached:
        for _ in range(n):
            logits, _ = model(*text(prompt + out))
            out.append(int(logits[0, -1].argmax()))
        return out
    cache = model.new_cache(1)
    logits, _ = model.extend(cache, *text(prompt), layers="text")
    while True:
        out.append(int(logits[0, -1].argmax()))
        if len(out) == n:
            return out
        logits, _ = model.extend(cache, *text(out[-1:]), layers="text")


def story_request(tok, ep):
    """The ids a story turn starts from: <|user|>{request}<|end|><|assistant|>."""
    return ([tok.special("<|user|>")] + tok.encode_ordinary(ep.story["text"])
            + [tok.special("<|end|>"), tok.special("<|assistant|>")])


def bench_decoding(model, tok, ep, n, device, repeats):
    """Tokens per second of greedy_decode with and without the KV cache, n tokens after a story request."""
    prompt = story_request(tok, ep)
    tps = {name: n / median_time(lambda: greedy_decode(model, prompt, n, cached), device, repeats)
           for name, cached in (("kv_cache", True), ("recompute", False))}
    out = {"prompt_tokens": len(prompt), "new_tokens": n, **{f"{k}_tokens_per_s": v for k, v in tps.items()},
           "speedup": tps["kv_cache"] / tps["recompute"]}
    print("\n".join(markdown(f"6c. Greedy text decoding: {n} tokens after a {len(prompt)}-token story request, batch 1",
                             ["path", "tokens/s", "speed-up"],
                             [["KV cache (model.extend, U layers)", f"{tps['kv_cache']:.0f}", f"{out['speedup']:.1f}x"],
                              ["recompute (forward on the whole prefix)", f"{tps['recompute']:.0f}", "1.0x"]])))
    return out


# 6d. sampling an audio span with and without the prefix cache

@torch.no_grad()
def sample_span(model, prefix, n_tokens, steps, sampler, cfg_scale, null_id, generator, cached=True):
    """Sample the n_tokens audio span that follows `prefix` (turn_prefix) -> x0 (1, n_tokens, latent),
    guided by the guidance_rows' <|null|> row unless cfg_scale = 1. cached: the prefix's keys and
    values are computed once (one extend), then each step of diffusion.sample_audio runs only the
    span's tokens against them. Otherwise every denoiser call re-runs forward() over the whole
    sequence, prefix and span (recompute_denoiser)."""
    dev = model.wte.weight.device
    guided = cfg_scale != 1.0
    if cached:
        tokens, audio, span_id = (z.to(dev) for z in guidance_rows(prefix, null_id if guided else None))
        R, T = tokens.shape
        cache = model.new_cache(R)
        model.extend(cache, tokens, audio, torch.zeros(R, T, device=dev), span_id, layers="all")
        return sample_audio(model, cache, n_tokens, steps, sampler, cfg_scale, generator)
    denoise = recompute_denoiser(model, prefix, n_tokens, null_id if guided else None)

    def v_fn(x, t):
        v = denoise(x, t)
        return cfg(v[:1], v[1:], cfg_scale) if guided else v

    noise = rand((1, n_tokens, model.config.latent_dim), generator, dev, normal=True)   # the draw sample_audio makes
    return SAMPLERS[sampler](v_fn, noise, steps)


def bench_prefix_cache(model, tok, seqs, config, device, repeats, n_turns):
    """Seconds to sample each assistant audio turn of one dialogue (the story, then its edits,
    each after everything said and heard before it) with config's sampler, steps and CFG: with
    the prefix cache (sample_span cached, as sample.Chat samples) and recomputing the sequence."""
    seq = max(seqs, key=lambda s: int(s["span_is_target"].sum()))   # the dialogue with the most edits
    targets = seq["span_is_target"].nonzero()[:, 0].tolist()[:n_turns]
    rows = []
    for k, span in enumerate(targets):
        prefix, n = turn_prefix(seq, span)
        seconds = {}
        for name, cached in (("cached_s", True), ("recompute_s", False)):
            def run():
                g = torch.Generator(device).manual_seed(0)
                sample_span(model, prefix, n, config.steps, config.sampler, config.cfg, tok.special("<|null|>"), g, cached)
            seconds[name] = median_time(run, device, repeats)
        rows.append({"turn": "story" if k == 0 else f"edit {k}", "context_tokens": len(prefix["tokens"]),
                     "audio_tokens": n, **seconds, "speedup": seconds["recompute_s"] / seconds["cached_s"]})
    print("\n".join(markdown(f"6d. Sampling one audio span: {config.sampler} {config.steps} steps, CFG {config.cfg:g}",
                             ["turn", "context tokens", "audio tokens", "prefix cache s", "recompute s", "speed-up"],
                             [[r["turn"], str(r["context_tokens"]), str(r["audio_tokens"]), f"{r['cached_s']:.3f}",
                               f"{r['recompute_s']:.3f}", f"{r['speedup']:.1f}x"] for r in rows])))
    print("Per step the cached path still runs the span's own tokens through every layer: the saving is the "
          "context's share, (context + audio) / audio, so it grows with every turn of the dialogue.")
    return {"sampler": config.sampler, "steps": config.steps, "cfg": config.cfg, "rows": rows}


# 6e. DPM-Solver++ against DDIM

def bench_samplers(model, tok, codec, judge, episodes, seqs, config, sizes, device):
    """multiFLAM and seconds per story of DDIM (sizes.ddim_steps) and DPM-Solver++ at each of
    sizes.dpm_steps, on the story turns of the first sizes.sampler_episodes test dialogues. The
    prefix holds the GROUND-TRUTH plan, so the comparison isolates the sampler from plan
    writing; every sampler starts from the same noise. Reports the fewest DPM++ steps whose mean
    score is within one standard error of DDIM's (or above it), and its speed-up."""
    runs = [("ddim", sizes.ddim_steps)] + [("dpmpp", s) for s in sizes.dpm_steps]
    scores, seconds = {r: [] for r in runs}, {r: [] for r in runs}
    null_id = tok.special("<|null|>")
    for i, (ep, seq) in enumerate(zip(episodes[:sizes.sampler_episodes], seqs)):
        prefix, n = turn_prefix(seq, 0)
        if i == 0:   # warm-up: first-call costs are not the sampler's
            sample_span(model, prefix, n, 2, "dpmpp", config.cfg, null_id, torch.Generator(device).manual_seed(0))
        for sampler, steps in runs:
            g = torch.Generator(device).manual_seed(ep.seed)
            synchronize(device)
            t0 = time.perf_counter()
            x0 = sample_span(model, prefix, n, steps, sampler, config.cfg, null_id, g)
            synchronize(device)
            seconds[sampler, steps].append(time.perf_counter() - t0)
            wav = codec.decode(AudioCodec.unpatchify(x0[0].float().cpu())).numpy()
            scores[sampler, steps].append(multiflam(judge, wav, ep.story["plan"]))

    def stats(run):
        s = np.array(scores[run])
        return {"sampler": run[0], "steps": run[1], "multiFLAM": float(s.mean()),
                "stderr": float(s.std(ddof=1) / np.sqrt(len(s))) if len(s) > 1 else 0.0,
                "seconds": float(np.mean(seconds[run]))}

    rows = [stats(r) for r in runs]
    ddim = rows[0]
    good = [r for r in rows[1:] if r["multiFLAM"] >= ddim["multiFLAM"] - ddim["stderr"]]
    best = min(good, key=lambda r: r["steps"], default=None)
    out = {"episodes": len(scores[runs[0]]), "cfg": config.cfg, "rows": rows,
           "fewest_dpmpp_steps_within_noise": best and best["steps"],
           "speedup_vs_ddim": best and ddim["seconds"] / best["seconds"]}
    print("\n".join(markdown(f"6e. DPM-Solver++ vs DDIM-{sizes.ddim_steps}: story audio from the ground-truth plan, "
                             f"{out['episodes']} test stories, CFG {config.cfg:g}, judge frame F1 {judge.info['frameF1']:.1f} %",
                             ["sampler", "steps", "multiFLAM ↑ (± s.e.)", "s per story", "speed-up vs DDIM"],
                             [[r["sampler"], str(r["steps"]), f"{r['multiFLAM']:.1f} ± {r['stderr']:.1f}", f"{r['seconds']:.2f}",
                               f"{ddim['seconds'] / r['seconds']:.1f}x"] for r in rows])))
    print(f"Fewest DPM++ steps within one standard error of DDIM-{sizes.ddim_steps}: "
          + ("none" if best is None else f"{best['steps']} ({out['speedup_vs_ddim']:.1f}x faster)"))
    return out


# 6f. end-to-end latency of a story

@torch.no_grad()
def story_latency(chat, ep, plan_tokens=None):
    """One story turn of sample.Chat (greedy plan with the KV cache, then the audio with the
    prefix cache, then the codec), phase by phase -> dict of seconds and the audio's duration.
    plan_tokens=None: the model writes its plan until <|audio|>, and the audio lasts what the plan
    says (the ground truth's duration if the plan is invalid). plan_tokens=n (an untrained
    model): exactly n greedy tokens, then <|audio|>, and the ground truth's duration."""
    ids, device = chat.ids, str(chat.device)
    duration = ep.story["plan"]["duration"]
    synchronize(device)
    t0 = time.perf_counter()
    chat._feed([ids["<|user|>"]], [False])
    chat._feed_words(ep.story["text"])
    logits = chat._feed([ids["<|end|>"], ids["<|assistant|>"]], [False, False])
    if plan_tokens is None:
        text, stop = chat._decode(logits)
        try:
            duration = plan_from_text(text)["duration"]
        except PlanError:
            pass
        if stop != ids["<|audio|>"]:
            chat._feed([ids["<|audio|>"]], [False])
    else:
        for _ in range(plan_tokens):
            logits = chat._feed([int(logits.argmax())], [True])
        chat._feed([ids["<|audio|>"]], [False])
    synchronize(device)
    t1 = time.perf_counter()
    z = sample_audio(chat.model, chat.cache, round(duration * SR / HOP) // PATCH, steps=chat.steps,
                     sampler=chat.sampler, cfg_scale=chat.cfg_scale, generator=chat.generator)[0]
    synchronize(device)
    t2 = time.perf_counter()
    chat.codec.decode(AudioCodec.unpatchify(z.float().cpu()))
    t3 = time.perf_counter()
    return {"plan_s": t1 - t0, "audio_s": t2 - t1, "codec_s": t3 - t2, "total_s": t3 - t0, "duration_s": duration}


def bench_end_to_end(model, tok, codec, episodes, config, n_stories, trained, device):
    """Latency and real-time factor of a story (story_latency) for the first n_stories test
    requests, next to the simulator's own render time of the ground-truth plans (the toy cascade's
    tools, as the paper sets AudioChat next to WavJourney). Each source is synthesised anew: the
    simulator's cache of dry signals is cleared before every render."""
    def chat(ep):
        return Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg, seed=ep.seed)

    def plan_tokens(ep):   # an untrained model never stops: it writes as many tokens as the true plan has
        return None if trained else len(tok.encode_ordinary(plan_to_text(ep.story["plan"])))

    story_latency(chat(episodes[0]), episodes[0], plan_tokens(episodes[0]))   # warm-up
    rows = []
    for ep in episodes[:n_stories]:
        r = story_latency(chat(ep), ep, plan_tokens(ep))
        r["render_s"] = median_time(lambda: (dry_signal.cache_clear(), render(ep.story["plan"], ep.seed)), "cpu", 1, 0)
        rows.append(r)
    mean_row = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    mean_row["rtf"] = mean_row["total_s"] / mean_row["duration_s"]
    mean_row["render_rtf"] = mean_row["render_s"] / mean_row["duration_s"]
    note = (f"{config.sampler} {config.steps} steps, CFG {config.cfg:g}, on {device}. "
            + ("Plans written by the model." if trained else
               "No --ckpt: a randomly initialised model of the preset's size, its plan forced to the ground-truth plan's "
               "token count and its audio to the true duration."))
    print("\n".join(markdown(f"6f. End-to-end latency per story ({len(rows)} stories, mean)",
                             ["system", "plan s", "audio sampling s", "codec s", "total s", "audio s", "RTF ↓"],
                             [["AudioChat-mini", f"{mean_row['plan_s']:.2f}", f"{mean_row['audio_s']:.2f}",
                               f"{mean_row['codec_s']:.2f}", f"{mean_row['total_s']:.2f}", f"{mean_row['duration_s']:.1f}",
                               f"{mean_row['rtf']:.3f}"],
                              ["simulator render (toy cascade's tools)", "–", "–", "–", f"{mean_row['render_s']:.2f}",
                               f"{mean_row['duration_s']:.1f}", f"{mean_row['render_rtf']:.3f}"]])))
    print(note)
    return {"stories": rows, "mean": mean_row, "trained": trained, "note": note}


# the whole benchmark

def bench(config, sizes=BenchSizes()):
    """Run sections 6a-6f on the current device; print their tables; write OUT_DIR/bench.json.
    With config.ckpt, its first checkpoint is the model of 6c-6f and 6e runs (with the judge
    cached in OUT_DIR/judge.pt); without, 6e is skipped. -> the bench.json dict."""
    t_start = time.perf_counter()
    device = pick_device(config.device)
    trained = bool(config.ckpt)
    if trained:
        model, tok, codec, _ = load_checkpoint(config.ckpt[0], device)
        episodes, seqs, _, _ = resimulated_test_dialogues(sizes.dialogues, tok, codec)
    else:
        episodes, seqs, tok, codec = resimulated_test_dialogues(sizes.dialogues, n_fit=sizes.fit_dialogues)
        torch.manual_seed(0)
        model = AudioChatModel(preset_config(tok.vocab_size, sizes.model)[0]).to(device).eval()
    results = {"device": device_name(device), "torch": torch.__version__,
               "ckpt": config.ckpt[0] if trained else None, "sections_s": {}}
    print(f"speed benchmarks on {results['device']}, torch {torch.__version__}; model: "
          f"{config.ckpt[0] if trained else 'randomly initialised, preset size'}, {model.num_params() / 1e6:.2f}M parameters")

    def section(key, fn, *args):
        t0 = time.perf_counter()
        results[key] = fn(*args)
        results["sections_s"][key] = time.perf_counter() - t0

    section("attention", bench_attention, seqs, preset_config(tok.vocab_size, sizes.model)[0], sizes.attn_lengths, device, sizes.repeats, sizes.math_max_len_cpu)
    section("training", bench_training, seqs, tok, device, sizes.repeats, sizes.model)
    section("decoding", bench_decoding, model, tok, episodes[0], sizes.decode_tokens, device, sizes.repeats)
    section("prefix_cache", bench_prefix_cache, model, tok, seqs, config, device, sizes.repeats, sizes.cache_turns)
    if trained:
        judge = load_or_train_judge(os.path.join(config.out_dir, "judge.pt"))
        section("samplers", bench_samplers, model, tok, codec, judge, episodes, seqs, config, sizes, device)
    else:
        results["samplers"] = {"skipped": "needs a trained model: python eval.py --bench --ckpt out/ckpt.pt"}
        print(f"\n### 6e. DPM-Solver++ vs DDIM\n\nskipped: {results['samplers']['skipped']}")
    section("end_to_end", bench_end_to_end, model, tok, codec, episodes, config, sizes.stories, trained, device)
    results["total_s"] = time.perf_counter() - t_start
    os.makedirs(config.out_dir, exist_ok=True)
    path = os.path.join(config.out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nbench took {results['total_s']:.0f} s; wrote {path}")
    return results


def main(argv):
    config = parse_config(EvalConfig, argv)
    if config.sampler not in SAMPLERS or config.n < 1:
        sys.exit(f"error: --sampler is one of {', '.join(SAMPLERS)} and --n at least 1")
    if config.bench:
        bench(config)
        return
    if not config.ckpt:
        sys.exit("error: give a checkpoint: python eval.py --ckpt out/ckpt.pt (repeat --ckpt to compare several)")
    evaluate(config)


if __name__ == "__main__":
    main(sys.argv[1:])
