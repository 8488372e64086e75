"""
Evaluate AudioChat-mini the way the paper does, at toy scale: StoryGen-Eval-toy (the test split
written by simulate_data.py), a judge model, the paper's metrics, and the paper's systems side by
side.

    python eval.py --ckpt out/ckpt.pt --n 20                            # ~ minutes on a 2-core CPU
    python eval.py --ckpt out/ckpt.pt --ckpt out/dense/ckpt.pt --n 50   # + the architecture ablation
    python eval.py --help                                               # every flag

Prints the paper's tables (storytelling, editing per sub-task, understanding) as markdown and
writes OUT_DIR/eval.json and OUT_DIR/eval.png. The judge is trained once (a few minutes) and cached
in OUT_DIR/judge.pt.

The file reads top to bottom:
1. the judge, "FLAM-lite": a frame-wise sound-event detector trained on simulator ground truth
   with FLAM's per-class sigmoid loss; the stand-in for OpenFLAM, which the paper's metrics use;
2. the metrics: multiFLAM, deltaMultiFLAM, editFLAM (on the judge), KAD (on judge embeddings),
   tcpWER (MeetEval's definition), caption multiFLAM, plan validity and plan recall;
3. the systems: ground truth, AudioChat, a cascade (the toy WavJourney) with and without audio
   context, and any other checkpoint (the architecture ablation);
4. the benchmark: run every system on the first n test dialogues, tabulate, plot.

The numbers are only as good as the judge (its held-out frame F1 is printed with them), and they
are not comparable with the paper's: the world, the judge and the embedding are toys.
"""
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import SR, HOP, FRAME_RATE, N_MELS, AudioCodec
from simulate_data import (AMBIENCES, MUSIC, SFX, VOICES, PlanError, make_dialogue, plan_from_text,
                           render, side_of, validate_plan)

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


def _dialogue_scenes(seed):
    """Worker: one simulated dialogue -> [(raw log-mel (T, 64) float16, plan)] for its story, each
    edited version of it, and the understanding scene (every audio the dialogue holds)."""
    dialogue, audios = make_dialogue(seed)
    turns, codec = dialogue["turns"], AudioCodec()
    scenes = []
    for user, reply in zip(turns[::2], turns[1::2]):
        k = reply.get("audio", user.get("audio"))
        scenes.append((codec.encode_raw(audios[k]).half(), reply["plan"]))
    return scenes


def simulate_scenes(n_dialogues, first_seed=JUDGE_SEEDS, workers=None):
    """n_dialogues simulated dialogues (all cores) -> list of dialogues, each a list of scenes."""
    workers = workers or os.cpu_count()
    with mp.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return pool.map(_dialogue_scenes, range(first_seed, first_seed + n_dialogues), chunksize=4)


class Judge(nn.Module):
    """Frame-wise detector: raw log-mel frames (B, T, 64) -> per-frame class logits (B, T, C).

    A stack of residual 1-D convolutions over time with growing dilation (receptive field
    ~1.6 s: enough to tell a dog's two woofs from two knocks, or a voice from its neighbours),
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
        self.codec = AudioCodec()   # only its fixed log-mel front end (encode_raw) is used

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
        raw = self.codec.encode_raw(wav)[None].to(self.mean.device)
        return torch.sigmoid(self(raw))[0].cpu().numpy()

    @torch.no_grad()
    def embed(self, wav):
        """wav (2, N) -> clip embedding (2 * width,): hidden features, mean ++ std over time."""
        h = self.features(self.codec.encode_raw(wav)[None].to(self.mean.device))[0]
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


def train_judge(n_dialogues=400, steps=1200, batch_size=16, crop=160, lr=3e-3, seed=0, verbose=True):
    """Simulate n_dialogues dialogues (~3.5 scenes each), hold out 10 % of them, and train a Judge
    with FLAM's loss (Eq. 4 of the FLAM paper: -log sigmoid(y * logit), y = +-1, i.e. binary
    cross-entropy per class and frame) on random crops of `crop` frames, left and right swapped
    at random (where a sound is does not change what it is). -> (judge, info dict)."""
    from tqdm import tqdm
    t0 = time.time()
    torch.manual_seed(seed)
    dialogues = simulate_scenes(n_dialogues)
    n_val = max(1, n_dialogues // 10)
    train = [s for d in dialogues[n_val:] for s in d]
    val = [s for d in dialogues[:n_val] for s in d]
    raws = [r.float() for r, _ in train]
    labels = [frame_labels(p, r.shape[0]) for r, p in zip(raws, (p for _, p in train))]
    frames, on = torch.cat(raws), torch.cat(labels)
    judge = Judge()
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
        picks = torch.randint(len(raws), (batch_size,), generator=g).tolist()
        xs, ys = [], []
        for i in picks:
            a = int(torch.randint(raws[i].shape[0] - crop + 1, (1,), generator=g))
            x = raws[i][a:a + crop]
            if torch.rand(1, generator=g) < 0.5:
                x = torch.cat([x[:, N_MELS:], x[:, :N_MELS]], dim=1)
            xs.append(x)
            ys.append(labels[i][a:a + crop])
        loss = F.binary_cross_entropy_with_logits(judge(torch.stack(xs)), torch.stack(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval()
    info = {"frameF1": 100 * frame_f1(judge, val), "train_s": time.time() - t0,
            "scenes": len(train), "heldout_scenes": len(val)}
    return judge, info
