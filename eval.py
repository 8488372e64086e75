"""
Evaluate AudioChat-mini the way the paper does, at toy scale: StoryGen-Eval-toy (the dataset's test
split), a judge model, the paper's metrics, and the paper's systems side by side.

    python eval.py --ckpt out/ckpt.pt                            # tables, OUT_DIR/eval.json, eval.png, report.html
    python eval.py --ckpt out/ckpt.pt --ckpt out/dense/ckpt.pt --ckpt out/mot/ckpt.pt --ckpt out/nocot/ckpt.pt
                                                                 # + the paper's ablations (Tables 1 and 4)
    python eval.py --bench [--ckpt out/ckpt.pt]                  # speed tables, OUT_DIR/bench.json
    python eval.py --help                                        # every flag

Read Part 1 line by line: the metrics, each as the paper (or MeetEval, or kadtk) defines it. Skim the rest:
  Part 2  the judge, "FLAM-lite": the stand-in for OpenFLAM, trained on simulator ground truth, cached in OUT_DIR;
  Part 3  the systems: ground truth, AudioChat (sample.Chat; its edits also from ground truth's audio,
          Table 5), the cascade with and without context;
  Part 4  every system on the first n test dialogues: the tables, eval.json, eval.png, report.html (the
          tables and loss curves, then a few dialogues turn by turn: players, spectrograms, plans);
  Part 5  the speed bench (--bench).
The numbers are only as good as the judge (its held-out frame F1 is printed with them), and they are
not comparable with the paper's: the world, the judge and the embedding are toys.
"""
import itertools, json, os, sys, time
import multiprocessing as mp
from collections import Counter
from dataclasses import dataclass
from html import escape

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from tokenizer import HOP, FRAME_RATE, N_MELS, AudioCodec
from model import AudioChatModel, document_positions, document_split, flex_block_mask, transfusion_mask
from diffusion import SAMPLERS, cfg, rand, sample_audio, transfusion_forcing_loss
from train import (BF16_DEVICES, PRESETS, TrainConfig, autocast_for, collate, load_checkpoint, load_dataset, load_tokenizers, matmul_flops,
                   median_time, model_config, opt, pack, parse_config, pick_device, pick_dtype, plot_losses, read_split, user_audio)
from sample import Chat, Turn, timed_lines
from simulate_data import (EDIT_KINDS, PLAN_ERROR_KINDS, DesignerAgent, PlanError, UserAgent, dry_signal, find,
                           plan_to_text, plot_story, render, run_calls, side_of)
from world import AMBIENCES, MUSIC, SFX, SR, VOICES, pick

# -----------------------------------------------------------------------------
# Part 1: the metrics (read line by line)
#
# 1a. On the judge: multiFLAM, deltaMultiFLAM, editFLAM. The paper computes them with OpenFLAM, a
# frame-wise detector (the probability that a described sound is active, every ~0.3 s), and states
# them in words (source recall; drift of what should not change; one success rule per edit type);
# here they run on our judge (Part 2), one output per sound and per voice at the codec's frame rate.
# A source is "detected" when the judge's mean probability for its class over its span reaches 0.5.

CLASSES = [*SFX, *AMBIENCES, *MUSIC, *VOICES]   # the judge's classes: every sound and every voice
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
DETECTED = 0.5
FRONT_END = AudioCodec()   # the codec's fixed log-mel analysis (encode_raw): all the judge hears

def source_class(src):
    """The judge's class of a plan source: its voice for speech, else its sound name."""
    return src["voice"] if src["type"] == "speech" else src["sound"]

def span_frames(src, T):
    """The frames of a source's span [start, start + dur) at FRAME_RATE, clipped to T -> slice."""
    return slice(min(round(src["start"] * FRAME_RATE), T), min(round((src["start"] + src["dur"]) * FRAME_RATE), T))

def span_probability(probs, src):
    """Mean judge probability of src's class over its span, from probs (T, C); 0 without audio (None)
    or when the span lies past the audio's end."""
    p = [] if probs is None else probs[span_frames(src, len(probs)), CLASS_INDEX[source_class(src)]]
    return float(p.mean()) if len(p) else 0.0

def multiflam(judge, wav, plan):
    """multiFLAM (storytelling, higher is better): % of the plan's sources the judge detects in wav
    (2, N) within their spans. No audio (None) scores 0."""
    probs = judge.probs(wav)
    return 100.0 * sum(span_probability(probs, s) >= DETECTED for s in plan["sources"]) / max(1, len(plan["sources"]))

def untouched(plan_before, plan_after):
    """The sources an edit must leave alone: same id, content, timing, gain and pan in both plans."""
    return [s for s in plan_before["sources"] if s in plan_after["sources"]]

def delta_multiflam(judge, wav_before, wav_after, plan_before, plan_after):
    """deltaMultiFLAM (editing consistency, lower is better): the mean absolute change, in % points, of
    the judge's span probability of each source the edit must leave alone, from the audio before the
    edit to the audio after. Missing audio (None) is silence: an edit that loses the audio counts all
    it lost. None when the edit leaves no source alone."""
    keep = untouched(plan_before, plan_after)
    if not keep:   # nothing to compare: the judge need not run
        return None
    pb, pa = judge.probs(wav_before), judge.probs(wav_after)
    return 100.0 * float(np.mean([abs(span_probability(pa, s) - span_probability(pb, s)) for s in keep]))

def content(src):
    """What a source is, as a request names it: type, voice or sound, and the words of a line."""
    return src["type"], source_class(src), src.get("text")

def find_source(plan, like):
    """The source of plan with like's content (the nearest in start time if several), or None: a
    request names its target by id in the reference plan, and a system's plan has its own ids."""
    same = [s for s in plan["sources"] if content(s) == content(like)]
    return min(same, key=lambda s: abs(s["start"] - like["start"]), default=None)

def frame_energy(wav):
    """(2, N) -> mean power of each channel in each codec frame of HOP samples: (2, N // HOP)."""
    T = wav.shape[1] // HOP
    return np.square(wav[:, :T * HOP].astype(np.float64)).reshape(2, T, HOP).mean(-1)

def exposed_frames(src, plan, T):
    """The frames of src's span (within the first T) where the fewest other sources play: where a
    change of src's level or position shows most in the mix -> frame indices (n,)."""
    span, others = np.arange(T)[span_frames(src, T)], np.zeros(T, np.int64)
    for s in plan["sources"]:
        if s["id"] != src["id"]:
            others[span_frames(s, T)] += 1
    return span[others[span] == others[span].min()] if len(span) else span

def edit_flam(judge, wav_before, wav_after, plan_before, plan_after, intent, reference_plan, seed=0):
    """editFLAM (editing instruction following, higher is better): 100 if the asked edit happened, else 0.

    The request (`intent`, as simulate_data's UserAgent writes it) names its target by id in the
    ground-truth plan before the edit (`reference_plan`); the target is found in the system's
    plan_before by content (find_source). An op counts only if the system's own plans show it
    (plan_before -> plan_after, by id) AND the audio shows it:
      add     a new id with the asked content, detected in its span after and not before;
      remove  the target's id is gone, and its class is no longer detected in its old span;
      change  same id, the asked new content, detected in its span after, the old content no longer
              in its old span. When only a line's words change (same voice: the judge knows voices,
              not words), the line's frames must be closer (mean absolute log-mel difference) to the
              simulator's rendering of plan_after than to its rendering of plan_before (with `seed`);
      volume  the gain moved the asked way, and the mix's level over the target's exposed frames
              (exposed_frames) moved the same way by >= 1 dB;
      move    the pan is on the asked side (simulate_data.side_of), and the mix's right-left balance
              over the exposed frames moved >= 1 dB that way (toward 0 dB for the centre);
      multi   every op succeeds.
    A turn without audio, or without a valid plan before or after, scores 0."""
    if wav_before is None or wav_after is None or plan_before is None or plan_after is None:
        return 0.0
    seen = {"before": judge.probs(wav_before), "after": judge.probs(wav_after)}
    ops = intent["ops"] if intent["edit"] == "multi" else [intent]
    return 100.0 * all(_edit_done(op, seen, wav_before, wav_after, plan_before, plan_after, reference_plan, seed) for op in ops)

def _edit_done(op, seen, wav_before, wav_after, plan_before, plan_after, reference_plan, seed):
    """One op of edit_flam's rules -> bool."""
    def detected(when, src):
        return span_probability(seen[when], src) >= DETECTED
    if op["edit"] == "add":
        old_ids = {s["id"] for s in plan_before["sources"]}
        new = [s for s in plan_after["sources"] if s["id"] not in old_ids and content(s) == content(op["source"])]
        return any(detected("after", s) and not detected("before", s) for s in new)
    target = find_source(plan_before, find(reference_plan, op["target"], op["edit"]))
    now = target and next((s for s in plan_after["sources"] if s["id"] == target["id"]), None)   # None: gone
    if target is None or (now is None) != (op["edit"] == "remove"):
        return False
    if op["edit"] == "remove":
        return not detected("after", target)
    if op["edit"] == "change":
        if content(now) != content({**target, **op["to"]}):
            return False
        if source_class(now) != source_class(target):
            return detected("after", now) and not detected("after", target)
        heard, *renders = (torch.logaddexp(*FRONT_END.encode_raw(w).split(N_MELS, 1)).numpy()   # log-mel of L + R power
                           for w in (wav_after, render(plan_after, seed), render(plan_before, seed)))
        T = min(len(heard), *(len(r) for r in renders))
        frames = np.union1d(*(np.arange(T)[span_frames(s, T)] for s in (target, now)))
        distance = [np.abs(heard[frames] - r[frames]).mean() for r in renders]
        return detected("after", now) and len(frames) > 0 and distance[0] < distance[1]
    frames = exposed_frames(now, plan_after, min(wav_before.shape[1], wav_after.shape[1]) // HOP)
    if not len(frames):
        return False
    energy = [frame_energy(w) for w in (wav_before, wav_after)]
    if op["edit"] == "volume":   # the level of the mix (both channels) over the frames, in dB
        level = [10 * np.log10(e[:, frames].sum(0).mean() + 1e-12) for e in energy]
        sign = 1 if op["direction"] == "up" else -1
        return sign * (now["gain_db"] - target["gain_db"]) > 0 and sign * (level[1] - level[0]) >= 1.0
    # move: the right-minus-left balance of the mix over the frames, in dB (> 0: to the right)
    balance = [10 * np.log10((e[1, frames].sum() + 1e-12) / (e[0, frames].sum() + 1e-12)) for e in energy]
    sign = {"left": -1, "right": 1}.get(op["where"], -np.sign(balance[0]))
    return side_of(now["pan"]) == op["where"] and sign * (balance[1] - balance[0]) >= 1.0

# 1b. KAD: kernel audio distance (arXiv 2502.15602; kadtk), an unbiased MMD^2 between the judge's
# embeddings of reference audio and of the audio being evaluated.

def median_pairwise_distance(x):
    """x: (N, D) -> the median L2 distance over all pairs: KAD's kernel bandwidth."""
    return torch.pdist(x.double()).median().item()

def kad(reference, evaluated, bandwidth=None, scale=100.0):
    """KAD (lower is better) = 100 x unbiased MMD^2 with the Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 bw^2)):

        KAD = 100 [ sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i, y_j) / (m n) ]

    reference x: (m, D), evaluated y: (n, D) judge embeddings, m, n >= 2. The bandwidth is the median
    pairwise distance of the REFERENCE set, so a score keeps its meaning when only the evaluated set
    changes (kadtk's README; its code takes the evaluated set). Unbiased: two samples of one
    distribution give about 0, possibly slightly negative."""
    x, y = reference.double(), evaluated.double()
    bw = median_pairwise_distance(x) if bandwidth is None else bandwidth
    def mean_kernel(a, b, same):
        k = torch.exp(-torch.cdist(a, b).pow(2) / (2 * bw ** 2))
        return (k.sum() - k.diagonal().sum()) / (len(a) * (len(a) - 1)) if same else k.mean()
    return scale * (mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)).item()

# 1c. tcpWER: time-constrained minimum-permutation WER as MeetEval defines it (github.com/fgnt/meeteval,
# doc/tcpwer.md): pseudo word timings, a collar on the hypothesis only, a Levenshtein distance whose
# matches need overlapping words, and the speaker assignment that minimises the total.

def pseudo_word_timings(segment, points=False):
    """Split a segment (start, end, text) into words, each with a share of [start, end] proportional to
    its length (MeetEval's `character_based`); points=True: the centre of its share
    (`character_based_points`) -> [(word, start, end)].

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
    """Edit distance between word streams [(word, start, end)] where a match or substitution needs the
    words' intervals to overlap strictly (a.start < b.end and a.end > b.start); insertions and
    deletions always cost 1 -> dict(errors, ins, del, sub)."""
    n, m = len(ref), len(hyp)
    prev = [(j, j, 0, 0) for j in range(m + 1)]   # cell = (errors, ins, dels, subs), row by row
    for i in range(1, n + 1):
        word, rs, re_ = ref[i - 1]
        cur = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            (e, a, d, s), (e2, a2, d2, s2), (hword, hs, he) = prev[j], cur[j - 1], hyp[j - 1]
            moves = [(e + 1, a, d + 1, s), (e2 + 1, a2 + 1, d2, s2)]   # delete ref word i, insert hyp word j
            if rs < he and re_ > hs:   # the words overlap: a match or a substitution is allowed
                e, a, d, s = prev[j - 1]
                moves.append((e + (word != hword), a, d, s + (word != hword)))
            cur.append(min(moves, key=lambda c: c[0]))   # the first of equal costs, in this order
        prev = cur
    e, a, d, s = prev[m]
    return {"errors": e, "ins": a, "del": d, "sub": s}

def tcp_wer(reference, hypothesis, collar=5.0):
    """tcpWER (diarised transcription, lower is better). reference, hypothesis: segments
    [(speaker, start, end, text)] -> dict(errors, length, ins, del, sub, wer, assignment).

    Character-based pseudo word timings for the reference, their centre points for the hypothesis,
    whose words the collar (s) widens. Each reference speaker is paired with a different hypothesis
    speaker, or none, to minimise the total errors; an unpaired speaker's words are all deletions
    (reference) or insertions (hypothesis). MeetEval solves the pairing with the Hungarian algorithm;
    with a story's few speakers, trying every pairing is exact and readable."""
    def streams(segments, points, pad):
        by_speaker = {}
        for spk, start, end, text in sorted(segments, key=lambda s: s[1]):
            words = pseudo_word_timings((start, end, text), points)
            by_speaker.setdefault(spk, []).extend((w, s - pad, e + pad) for w, s, e in words)
        return by_speaker
    ref, hyp = streams(reference, False, 0.0), streams(hypothesis, True, collar)
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
    for k in ("errors", "ins"):   # an unpaired hypothesis speaker's words are insertions
        stats[k] += unpaired(set(assignment.values()))
    length = sum(len(ws) for ws in ref.values())
    wer = stats["errors"] / length if length else float(stats["errors"] > 0)
    return {**stats, "length": length, "wer": wer, "assignment": assignment}

# 1d. Answers and plans: parse what a system wrote (any text) and score it against the truth.

def parse_transcript(text):
    """A transcription, one line per utterance "{start:.1f}-{end:.1f} {voice}: {words}"
    (simulate_data.transcript) -> tcp_wer segments [(voice, start, end, words)]. A line that does not
    parse adds no words: the reference words it may have meant become deletions."""
    lines = ((start, end, *rest.partition(":")) for start, end, rest in timed_lines(text))
    return [(voice.strip(), start, end, " ".join(words.split())) for start, end, voice, colon, words in lines
            if colon and voice.strip() and " " not in voice.strip() and words.split()]

def reference_segments(plan):
    """The true transcript of a scene: its speech sources as tcp_wer segments."""
    return [(s["voice"], s["start"], s["start"] + s["dur"], s["text"]) for s in plan["sources"] if s["type"] == "speech"]

def caption_multiflam(answer_text, true_plan):
    """Caption multiFLAM (captioning, higher is better), on text: % of the true scene's sources the
    caption names (one line each, "{start:.1f}-{end:.1f} {sound or voice}", simulate_data.caption) with
    an overlapping span, each line used once. (The paper scores a caption against the audio with
    OpenFLAM; in a closed world a named source and its span are what the judge would look for.)"""
    lines = [(a, b, name) for a, b, name in timed_lines(answer_text) if " " not in name]
    found = 0
    for s in sorted(true_plan["sources"], key=lambda s: s["start"]):
        a, b = s["start"], s["start"] + s["dur"]
        match = next((line for line in lines if line[2] == source_class(s) and line[0] < b and line[1] > a), None)
        if match:
            lines.remove(match)
            found += 1
    return 100.0 * found / max(1, len(true_plan["sources"]))

def plan_validity(failures):
    """Plan validity in %: the share of turns whose tool calls the studio executes, from each turn's
    Turn.failure (None: executed; else its PlanError kind); None when there were no turns."""
    return mean(100.0 * (f is None) for f in failures)

def plan_recall(reference_plan, plan):
    """Plan source recall in %: the share of the requested sources (the ground-truth plan's) that the
    system's plan names, matched by content, each of its sources used once; 0 for None (invalid)."""
    asked, found = (Counter(map(content, p["sources"] if p else [])) for p in (reference_plan, plan))
    return 100.0 * sum((asked & found).values()) / max(1, len(reference_plan["sources"]))   # & : matched once each


# -----------------------------------------------------------------------------
# Part 1b: requests as people write them
#
# Each request has a word no phrase table of the user agent uses (test_all checks): does the model
# follow the request, or the templates? Each item: a story request, the sources it asks for ('voice:
# words' for a line, else the sound), and for most an edit request with the change it asks for (the
# intents' fields, sources named the same way), run through sample.Chat as a user would type them.

HELDOUT = [
    ("could you whip up a quick clip? ben says \"where is my dog\" and then a dog starts yapping off to the left", ["ben: where is my dog", "dog_bark"],
     "ditch the barking", {"edit": "remove", "target": "dog_bark"}),
    ("Scene idea: thunder rolls in, then cleo goes \"the storm comes tonight\" -- heavy downpour the whole time", ["thunder", "cleo: the storm comes tonight", "rain"],
     "can we have wind instead of the downpour?", {"edit": "change", "target": "rain", "to": {"sound": "wind"}}),
    ("i need a short bit where a phone goes off on the right and dan answers \"hello my friend\"", ["phone_ring", "dan: hello my friend"],
     "actually can eve do dan's line instead?", {"edit": "change", "target": "dan: hello my friend", "to": {"voice": "eve"}}),
    ("Give me ava on the left: \"look at the moon\". Finn, on the right, answers \"it was a cold night\"", ["ava: look at the moon", "finn: it was a cold night"],
     "finn's bit is way too loud, bring it down a notch", {"edit": "volume", "target": "finn: it was a cold night", "direction": "down"}),
    ("first a pooch barks, a cat meows back at it, then eve: \"the dog and the cat\"", ["dog_bark", "cat_meow", "eve: the dog and the cat"],
     "nix the cat", {"edit": "remove", "target": "cat_meow"}),
    ("Footsteps, then dan: \"i need a home\". Make it rainy", ["footsteps", "dan: i need a home", "rain"]),
    ("ben calls out \"good morning my queen\", followed by clapping, with the chatter of a crowd underneath", ["ben: good morning my queen", "applause", "crowd"],
     "can the clapping come from the right side?", {"edit": "move", "target": "applause", "where": "right"}),
    ("short one please: cleo saying \"please wait here\" as a clock ticks away behind her", ["cleo: please wait here", "clock_tick"]),
    ("Someone raps at the door, it creaks open, and finn says \"come here\"", ["knock", "door_creak", "finn: come here"],
     "pan finn hard right", {"edit": "move", "target": "finn: come here", "where": "right"}),
    ("Can we get a bird tweeting, and then ava (center) saying \"good morning my friend\"? some flute in the background too", ["bird_chirp", "ava: good morning my friend", "flute"],
     "rather than \"good morning my friend\", have ava say \"look at the sun\"", {"edit": "change", "target": "ava: good morning my friend", "to": {"text": "look at the sun"}}),
    ("wind howling outside while dan and eve talk. dan: \"where is the ship\" eve: \"the ship is lost\"", ["wind", "dan: where is the ship", "eve: the ship is lost"],
     "eve's reply should come from the left", {"edit": "move", "target": "eve: the ship is lost", "where": "left"}),
    ("glass smashes on the right. after a beat, ben: \"stop the man\"", ["glass_break", "ben: stop the man"]),
    ("Something spooky: a creaking door, then eve says \"it was a dark night\", with the wind blowing", ["door_creak", "eve: it was a dark night", "wind"],
     "crank up the wind", {"edit": "volume", "target": "wind", "direction": "up"}),
    ("Ben on the right: \"i see the sun\". finn on the left: \"i see the moon\". then a bell chimes", ["ben: i see the sun", "finn: i see the moon", "bell"],
     "swap their sides: ben to the left, finn to the right", {"edit": "multi", "ops": [{"edit": "move", "target": "ben: i see the sun", "where": "left"}, {"edit": "move", "target": "finn: i see the moon", "where": "right"}]}),
    ("a car horn blares, cleo: \"hurry up\", and then footsteps running off", ["car_horn", "cleo: hurry up", "footsteps"],
     "tone down the horn a little", {"edit": "volume", "target": "car_horn", "direction": "down"}),
    ("ava greets us with \"hello my friend\", then a phone rings", ["ava: hello my friend", "phone_ring"],
     "could we have some gentle piano playing under everything?", {"edit": "add", "source": "piano"}),
    ("eve says \"i know the road\" as footsteps go past. A dog barks at the end", ["eve: i know the road", "footsteps", "dog_bark"],
     "can we lose the footsteps?", {"edit": "remove", "target": "footsteps"}),
    ("kids story vibe: cleo says \"the little bird sings\", a bird chirps on the left, then \"i like the bird,\" finn adds", ["cleo: the little bird sings", "bird_chirp", "finn: i like the bird"]),
    ("just ben, two lines: \"goodbye my friend\" and then \"the train comes soon\". a clock ticking somewhere", ["ben: goodbye my friend", "ben: the train comes soon", "clock_tick"]),
    ("dan, panned left, says \"the big ship comes home\" and a bell rings while he talks. wind in the background", ["dan: the big ship comes home", "bell", "wind"],
     "Get rid of the bell and put dan dead center", {"edit": "multi", "ops": [{"edit": "remove", "target": "bell"}, {"edit": "move", "target": "dan: the big ship comes home", "where": "center"}]}),
    ("Make me an intro: applause, then finn, front and center, says \"thank you my friend\"", ["applause", "finn: thank you my friend"]),
    ("ava asks \"where is the cat\"; a meow comes back from the right", ["ava: where is the cat", "cat_meow"],
     "at the very end, ben should chime in with \"come here\"", {"edit": "add", "source": "ben: come here", "when": "end"}),
    ("thunder cracks, then eve: \"the night is cold\". some piano over it all", ["thunder", "eve: the night is cold", "piano"],
     "instead of the thunder i'd prefer glass breaking", {"edit": "change", "target": "thunder", "to": {"sound": "glass_break"}}),
    ("two people in a busy crowd: ben says \"go away\" and cleo replies \"please wait outside\"", ["crowd", "ben: go away", "cleo: please wait outside"],
     "throw in a car horn halfway through", {"edit": "add", "source": "car_horn", "when": "middle"}),
]

def named(spec):
    """'ben: hello my friend' or 'dog_bark' -> a source's content fields (eval.content reads them)."""
    voice, _, text = spec.partition(": ")
    if text:
        return {"type": "speech", "voice": voice, "text": text}
    return {"type": next(t for t, names in (("sfx", SFX), ("ambience", AMBIENCES), ("music", MUSIC)) if spec in names), "sound": spec}

def plan_edit_done(change, before, after):
    """Did an edit's plan make the asked change (held-out: sources named by content), and leave every
    other source of the plan before exactly as it was? False when either plan is missing."""
    if before is None or after is None:
        return False
    touched, old_ids = set(), {s["id"] for s in before["sources"]}
    for op in change["ops"] if change["edit"] == "multi" else [change]:
        if op["edit"] == "add":
            new = [s for s in after["sources"] if s["id"] not in old_ids and content(s) == content(named(op["source"]))]
            if not new or ("where" in op and side_of(new[0]["pan"]) != op["where"]):
                return False
            continue
        target = next((s for s in before["sources"] if content(s) == content(named(op["target"]))), None)
        now = target and next((s for s in after["sources"] if s["id"] == target["id"]), None)
        if target is None or (now is None) != (op["edit"] == "remove"):
            return False
        touched.add(target["id"])
        if op["edit"] == "change" and content(now) != content({**target, **op["to"]}) or \
                op["edit"] == "volume" and (now["gain_db"] - target["gain_db"]) * (1 if op["direction"] == "up" else -1) <= 0 or \
                op["edit"] == "move" and side_of(now["pan"]) != op["where"]:
            return False
    return all(s in after["sources"] for s in before["sources"] if s["id"] not in touched)

def timed(fn, *args):
    """A chat turn fn(*args) -> its Turn (which times itself); a dialogue that outgrew the model's
    context (ValueError) is a Turn with that error: nothing more can be said."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except ValueError as e:
        return Turn(f"error: {e}", error=str(e), seconds=time.perf_counter() - t0)

def run_heldout(model, tok, codec, config):
    """Every held-out request through one sample.Chat per item -> {"storySources": % of story plans
    naming every asked source, "editsDone": % of edits making the asked change, "turns": [...]}."""
    turns = []
    for k, (story_text, sources, *edit) in enumerate(tqdm(HELDOUT, desc="held-out requests", unit="request")):
        chat = Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg, seed=k)
        story = timed(chat.generate, story_text)
        row = {"story": story_text, "calls": story.text, "sources": plan_recall({"sources": list(map(named, sources))}, story.plan) == 100}
        if edit:
            after = timed(chat.edit, edit[0])
            row.update(edit=edit[0], edit_calls=after.text, done=plan_edit_done(edit[1], story.plan, after.plan))
        turns.append(row)
    return {"storySources": mean(100.0 * t["sources"] for t in turns), "editsDone": mean(100.0 * t["done"] for t in turns if "edit" in t),
            "n": [len(turns), sum("edit" in t for t in turns)], "turns": turns}


# -----------------------------------------------------------------------------
# Part 2: the judge, "FLAM-lite" (skim)
#
# A closed-set frame-wise detector trained as FLAM is (a sigmoid per class and frame, binary cross-entropy,
# each class's bias starting at the log-odds of its frequency) on scenes the simulator renders, whose labels
# are exact: a source plays on the frames of [start, start + dur). It never sees the AudioChat model, and
# its scenes have their own seeds (apart from the dataset's splits): it never hears a test dialogue.

JUDGE_SEEDS = 90_000_000

def frame_labels(plan, T):
    """Plan -> (T, C) float32 multi-hot frame labels: class c is on where a source of class c plays."""
    y = torch.zeros(T, len(CLASSES))
    for s in plan["sources"]:
        y[span_frames(s, T), CLASS_INDEX[source_class(s)]] = 1.0
    return y

def _judge_scenes(seed, n_edits=2):
    """Worker: seed -> [(raw log-mel (T, 64) float16, plan)]: a story by the simulator's designer agent,
    n_edits edited versions (the scenes the judge will score), and one through the codec (log-mel ->
    Griffin-Lim -> log-mel), since the judge must also hear a model's decoded audio."""
    rng = np.random.default_rng(seed)
    user, designer, plan, scenes = UserAgent(), DesignerAgent(), None, []
    for _ in range(100):   # the agents may ask for the impossible (a line that no longer fits): ask again
        intent = (user.edit_intent(plan, rng, pick(rng, [k for k in EDIT_KINDS if k != "multi"])) if scenes
                  else user.story_intent(rng))
        try:
            plan = run_calls(designer.respond(plan, intent), plan, seed)
        except PlanError:
            continue
        scenes.append((FRONT_END.encode_raw(render(plan, seed)).half(), plan))
        if len(scenes) == 1 + n_edits:
            break
    raw, plan = scenes[int(rng.integers(len(scenes)))]
    return scenes + [(FRONT_END.encode_raw(FRONT_END.decode_raw(raw.float())).half(), plan)]

class Judge(nn.Module):
    """Raw log-mel frames (B, T, 64) -> per-frame class logits (B, T, C), on the CPU: residual 1-D convolutions
    with growing dilation (~1.7 s of context: a dog's two woofs, a voice among its neighbours) on standardised
    frames, then a 1x1 convolution. `embed` pools the last features over time (mean ++ std): the clip embedding
    KAD compares, as kadtk compares PANNs or CLAP embeddings."""

    def __init__(self, width=96, dilations=(1, 2, 4, 8, 16, 1)):
        super().__init__()
        self.args = {"width": width, "dilations": list(dilations)}   # saved with the weights, to rebuild it
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
        return None if wav is None else torch.sigmoid(self(FRONT_END.encode_raw(wav)[None]))[0].numpy()

    @torch.no_grad()
    def embed(self, wav):
        """wav (2, N) -> clip embedding (2 * width,): hidden features, mean ++ std over time."""
        h = self.features(FRONT_END.encode_raw(wav)[None])[0]
        return torch.cat([h.mean(-1), h.std(-1)])

@torch.no_grad()
def frame_f1(judge, scenes, threshold=0.5):
    """Micro-averaged frame F1 in % over every class and frame of scenes [(raw, plan)]."""
    tp = fp = fn = 0
    for raw, plan in scenes:
        pred, y = torch.sigmoid(judge(raw.float()[None]))[0] >= threshold, frame_labels(plan, raw.shape[0]).bool()
        tp, fp, fn = tp + (pred & y).sum().item(), fp + (pred & ~y).sum().item(), fn + (~pred & y).sum().item()
    return 100 * 2 * tp / max(1, 2 * tp + fp + fn)

def crop_of(raws, labels, crop, g, mix_p=0.0):
    """A random crop of `crop` frames of a random scene -> (frames (crop, 64), labels (crop, C)): its channels
    swapped half the time (where a sound is does not change what it is), and with probability mix_p mixed
    with another crop (log-mels by logaddexp, labels by max), since stories are full of overlapping sounds."""
    i = int(torch.randint(len(raws), (1,), generator=g))
    a = int(torch.randint(raws[i].shape[0] - crop + 1, (1,), generator=g))
    x, y = raws[i][a:a + crop], labels[i][a:a + crop]
    if torch.rand(1, generator=g) < 0.5:
        x = torch.cat([x[:, N_MELS:], x[:, :N_MELS]], dim=1)
    if mix_p and torch.rand(1, generator=g) < mix_p:
        x2, y2 = crop_of(raws, labels, crop, g)
        softer = 6 * float(torch.rand(1, generator=g)) * np.log(10) / 10   # 0..6 dB in natural-log units
        x, y = torch.logaddexp(x, x2 - softer), torch.maximum(y, y2)
    return x, y

def train_judge(n_stories=500, steps=1500, batch_size=16, crop=160, lr=3e-3, mix_p=0.5, width=96, seed=0, verbose=True):
    """Simulate n_stories stories (4 scenes each, all cores), hold out 10 % of them, and train a Judge with FLAM's
    loss (-log sigmoid(y * logit), y = +-1) on crop_of's crops -> (judge, {"frameF1": held-out frame F1 in %})."""
    torch.manual_seed(seed)
    with mp.Pool(os.cpu_count(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        stories = pool.map(_judge_scenes, range(JUDGE_SEEDS, JUDGE_SEEDS + n_stories), chunksize=4)
    n_val = max(1, n_stories // 10)   # held out by story: no version of a held-out scene is trained on
    train, val = [s for d in stories[n_val:] for s in d], [s for d in stories[:n_val] for s in d]
    raws, labels = zip(*((r.float(), frame_labels(p, r.shape[0])) for r, p in train))
    frames, prior = torch.cat(raws), torch.cat(labels).mean(0).clamp(1e-4, 1 - 1e-4)
    judge = Judge(width)
    with torch.no_grad():   # FLAM: an untrained judge predicts each class's prior
        judge.mean.copy_(frames.mean(0))
        judge.std.copy_(frames.std(0).clamp(min=1e-3))
        judge.head.bias.copy_(torch.log(prior / (1 - prior)))
    optimizer, g = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4), torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="judge", unit="step", disable=not verbose)
    for step in bar:
        for group in optimizer.param_groups:   # cosine decay to 10 %
            group["lr"] = lr * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        xs, ys = zip(*(crop_of(raws, labels, crop, g, mix_p) for _ in range(batch_size)))
        loss = F.binary_cross_entropy_with_logits(judge(torch.stack(xs)), torch.stack(ys))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return judge.eval(), {"frameF1": frame_f1(judge, val)}

def load_or_train_judge(path="out/judge.pt", verbose=True, **train_kwargs):
    """The judge cached at path, else (also when it was made for another inventory of sounds and
    voices) a freshly trained one, saved there atomically -> Judge (eval mode) with .info (train_judge's)."""
    if os.path.isfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if ckpt["classes"] == CLASSES:
                judge = Judge(**ckpt["args"])
                judge.load_state_dict(ckpt["model"])
                judge.info = ckpt["info"]
                return judge.eval()
        except Exception as e:   # a damaged or foreign cache is trained again, never trusted
            print(f"note: {path} is not a usable judge ({type(e).__name__}); training a new one")
    if verbose:
        print(f"training the judge (FLAM-lite) for these sounds and voices once; it is cached in {path}")
    judge, judge.info = train_judge(verbose=verbose, **train_kwargs)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"model": judge.state_dict(), "args": judge.args, "classes": CLASSES, "info": judge.info}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return judge


# -----------------------------------------------------------------------------
# Part 3: the systems (skim)
#
# StoryGen-Eval-toy is the dataset's test split: each dialogue is a story request, one or two edit
# requests and an understanding request about a fresh scene. The shards store log-mels, not
# waveforms, so the ground truth is rendered again from its plans: a pure function of (plan, seed).
# A system's run is {"turns": [story, *edits], "answer"}, each a sample.Turn (answer None: no understanding).

@dataclass
class Episode:
    """One test dialogue, as the benchmark reads it."""
    seed: int          # the dialogue's render seed (the story and its edits)
    story: dict        # {"text": the user's request, "intent", "plan": the ground-truth plan, "calls": its calls}
    edits: list        # the same, for each edit request, in order
    request: str       # the understanding request ("Who says what, and when?", ...)
    task: str          # "transcribe" | "describe"
    scene: dict        # the understanding clip's true plan
    scene_seed: int
    answer: str        # the true answer (simulate_data.transcript or caption of the scene)

def load_episodes(data_dir, n):
    """The first n dialogues of data_dir's test split -> [Episode], in train.load_dataset's order."""
    return [episode(dialogue) for dialogue, _ in itertools.islice(read_split(data_dir, "test"), n)]

def episode(dialogue):
    """A dialogue as simulate_data.make_dialogue writes it -> Episode."""
    turns = [{"text": u["text"], "intent": u["intent"], "plan": a["plan"], "calls": a["text"]}
             for u, a in zip(dialogue["turns"][::2], dialogue["turns"][1::2])]
    last = turns.pop()
    return Episode(seed=dialogue["seed"], story=turns[0], edits=turns[1:], request=last["text"], task=last["intent"]["task"],
                   scene=last["plan"], scene_seed=last["intent"]["scene_seed"], answer=dialogue["turns"][-1]["text"])

def rendered(turn, seed):
    """A turn's plan rendered by the simulator's tools -> the Turn with that audio (seconds: the rendering);
    a turn without a valid plan has no audio."""
    if turn.plan is None:
        return turn
    t0 = time.perf_counter()
    wav = render(turn.plan, seed)
    return Turn(turn.text, turn.plan, wav, seconds=time.perf_counter() - t0)

def run_ground_truth(ep):
    """The reference run: the dialogue's own plans, rendered, and the true answer."""
    truth = [rendered(Turn(t["calls"], t["plan"]), ep.seed) for t in [ep.story, *ep.edits]]
    return {"turns": truth, "answer": Turn(ep.answer)}

def run_audiochat(model, tok, codec, ep, config):
    """AudioChat-mini in one sample.Chat per dialogue, as the paper's tables run it: the story, each
    edit conditioned on the model's OWN previous audio, then the understanding request about the
    (re-rendered) true clip -> its run, the Turns with their seconds."""
    chat = Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg, seed=ep.seed)
    return {"turns": [timed(chat.generate, ep.story["text"]), *(timed(chat.edit, e["text"]) for e in ep.edits)],
            "answer": timed(chat.understand, render(ep.scene, ep.scene_seed), ep.request)}

FROM_TRUTH = "_from_gt_audio"   # the first model's Table 5 system: audiochat_from_gt_audio

def run_from_truth(model, tok, codec, ep, config, truth):
    """The paper's Table 5: each edit conditioned on ground truth's turns before it (their audio in `truth`,
    run_ground_truth's, not the model's own), one sample.Chat per edit -> a run with ground truth's story,
    the model's edits and "before": ground truth's turns, edit k changing turn k."""
    requests, edits = [ep.story, *ep.edits], []
    for k in range(1, len(requests)):
        chat = Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg, seed=ep.seed)
        for request, made in zip(requests[:k], truth["turns"]):
            chat.given(request["text"], request["calls"], request["plan"], made.wav)
        edits.append(timed(chat.edit, requests[k]["text"]))
    return {"turns": [truth["turns"][0], *edits], "before": truth["turns"], "answer": None}

def run_cascade(chat_run, ep, context=True):
    """The toy WavJourney: the model's plans (its audiochat run's) rendered by the simulator's tools. With
    context, one render seed per dialogue, so what an edit keeps stays sample-identical; without (the
    paper's "Cascade (No audio context)"), a fresh seed per turn. It understands no audio: answer None."""
    turns = [rendered(t, ep.seed if context else ep.seed + 1_000_003 * (k + 1)) for k, t in enumerate(chat_run["turns"])]
    return {"turns": turns, "answer": None}

def laid_out(reference_plan, plan):
    """The requested scene where the system put it: each reference source at the span the system's
    plan gives the same content (matched one to one), else at its reference span. multiFLAM on this
    asks whether the audio holds every requested source where the system's own plan says: an equally
    valid timing is not punished, and a source the plan forgot is still looked for."""
    pool, sources = {"sources": list(plan["sources"]) if plan else []}, []
    for s in reference_plan["sources"]:
        mine = find_source(pool, s)
        if mine is not None:
            pool["sources"].remove(mine)
        sources.append({**s, "start": mine["start"], "dur": mine["dur"]} if mine else s)
    return {"duration": reference_plan["duration"], "sources": sources}

def embedding(judge, turn, duration):
    """The judge's embedding of a turn's audio; a turn without audio is `duration` s of silence."""
    return judge.embed(turn.wav if turn.wav is not None else np.zeros((2, round(duration * SR)), np.float32))

def score_episode(judge, ep, run):
    """Every per-turn number of one system on one dialogue, and the embeddings KAD needs. A turn
    without audio scores 0 on multiFLAM and editFLAM and is silence for KAD; it has no deltaMultiFLAM
    (a system that makes no audio must not look perfectly consistent)."""
    def plan(turn, reference):   # a turn with audio but no plan (--cot=false) is judged where ground truth's plan puts it
        return reference if turn.wav is not None and turn.plan is None else turn.plan
    (story, *edits), answer, requests = run["turns"], run["answer"], [ep.story, *ep.edits]
    planned = story.text != "" or story.wav is None
    record = {"story": {"multiFLAM": multiflam(judge, story.wav, laid_out(ep.story["plan"], story.plan)), "planned": planned,
                        "planFailure": story.failure, "planRecall": plan_recall(ep.story["plan"], story.plan) if planned else None,
                        "seconds": story.seconds, "audio_s": 0.0 if story.wav is None else story.wav.shape[1] / SR,
                        "emb": embedding(judge, story, ep.story["plan"]["duration"])},
              "edits": [], "answer": {"task": ep.task, "tcp": None, "caption": None, "pastEnd": None}}
    for k, (request, after) in enumerate(zip(ep.edits, edits)):
        before = run.get("before", run["turns"])[k]   # Table 5: ground truth's turn, else the system's own last
        reference_before = requests[k]["plan"]
        pb, pa = plan(before, reference_before), plan(after, request["plan"])
        heard = before.wav is not None and after.wav is not None   # audio implies a valid plan
        record["edits"].append({
            "kind": request["intent"]["edit"],
            "editFLAM": edit_flam(judge, before.wav, after.wav, pb, pa, request["intent"], reference_before, ep.seed),
            "deltaMultiFLAM": delta_multiflam(judge, before.wav, after.wav, pb, pa) if heard else None,
            "planFailure": after.failure, "emb": embedding(judge, after, request["plan"]["duration"])})
    if answer is not None:
        record["answer"]["pastEnd"] = answer.past_end > 0   # the chat cut or dropped lines past the clip's end
        if ep.task == "transcribe":
            record["answer"]["tcp"] = tcp_wer(reference_segments(ep.scene), parse_transcript(answer.text))
        else:
            record["answer"]["caption"] = caption_multiflam(answer.text, ep.scene)
    return record

def mean(values):
    """Mean of the values that exist (None = not applicable), or None if none does."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None

def aggregate(records, reference):
    """Per-dialogue records of one system, and the ground truth's (the KAD reference; None for the
    ground truth itself) -> its eval.json entry, rates in %."""
    stories, answers, edits = [r["story"] for r in records], [r["answer"] for r in records], [e for r in records for e in r["edits"]]
    def kad_against(turns_of):
        if reference is None or len(records) < 2:
            return None
        return kad(torch.stack([x["emb"] for x in turns_of(reference)]), torch.stack([x["emb"] for x in turns_of(records)]))
    planned = all(s["planned"] for s in stories)   # else --cot=false: no plans, no plan metrics
    def failures(turns):   # {PlanError kind: how many turns' plans failed that way}
        return {kind: sum(t["planFailure"] == kind for t in turns) for kind in PLAN_ERROR_KINDS} if planned else None
    validity = lambda turns: plan_validity(t["planFailure"] for t in turns) if planned else None
    audio_s, tcp = sum(s["audio_s"] for s in stories), [a["tcp"] for a in answers if a["tcp"] is not None]
    editing = {}
    for kind in ("overall", *EDIT_KINDS):
        rows = [e for e in edits if kind in ("overall", e["kind"])]
        editing[kind] = {"editFLAM": mean(e["editFLAM"] for e in rows), "deltaMultiFLAM": mean(e["deltaMultiFLAM"] for e in rows),
                         "planValidity": validity(rows), "n": len(rows)}
    editing["overall"].update(KAD=kad_against(lambda rs: [e for r in rs for e in r["edits"]]), planFailures=failures(edits))
    tcp_wer_ = 100.0 * sum(t["errors"] for t in tcp) / max(1, sum(t["length"] for t in tcp)) if tcp else None
    return {"storytelling": {"multiFLAM": mean(s["multiFLAM"] for s in stories), "KAD": kad_against(lambda rs: [r["story"] for r in rs]),
                             "planValidity": validity(stories), "planRecall": mean(s["planRecall"] for s in stories),
                             "planFailures": failures(stories), "latency_s": mean(s["seconds"] for s in stories),
                             "rtf": sum(s["seconds"] for s in stories) / audio_s if audio_s else None},
            "editing": editing, "understanding": {"tcpWER": tcp_wer_, "captionMultiFLAM": mean(a["caption"] for a in answers),
                              "pastEnd": mean(100.0 * a["pastEnd"] for a in answers if a["pastEnd"] is not None)}}

def answer_positions(seq):
    """(L - 1,) bool: the positions i whose next token belongs to the assistant's answer about the
    user's clip (the clip comes last in a dialogue, simulate_data.make_dialogue)."""
    return seq["text_target"][:-1] & (torch.arange(len(seq["span_id"]) - 1) > int(user_audio(seq).nonzero()[-1]))

@torch.no_grad()
def listening_profile(model, seqs, tasks):
    """Does the model listen? Teacher-forced on the understanding turn of test dialogues
    (train.load_dataset sequences, with their tasks): the mean cross-entropy (nats per token) of the
    true answer with the clip in context, and with the clip replaced by the average sound (zeros, the
    mean of normalised latents); equal means the answer ignores the audio.
    -> {task: {"n", "ce_clip", "ce_without_clip"}} per task (transcribe, describe)."""
    dev, ces = model.wte.weight.device, {}
    for task, seq in zip(tasks, seqs):
        if len(seq["tokens"]) > model.config.block_size:   # a model trained on shorter rows cannot read it
            continue
        where = answer_positions(seq).to(dev)
        tokens, span, targets = seq["tokens"][None].to(dev), seq["span_id"][None].to(dev), seq["tokens"][1:].to(dev)[where]
        row = ces.setdefault(task, {"ce_clip": [], "ce_without_clip": []})
        for key, audio in (("ce_clip", seq["audio"]), ("ce_without_clip", seq["audio"] * ~user_audio(seq)[:, None])):
            logits = model(tokens, audio[None].to(dev), torch.zeros(span.shape, device=dev), span)[0][0, :-1]
            row[key].append(float(F.cross_entropy(logits[where].float(), targets)))
    return {task: {"n": len(row["ce_clip"]), **{k: mean(v) for k, v in row.items()}} for task, row in ces.items()}

def checkpoint_val(model, ckpt):
    """The model's parameter count and its checkpoint's last validation (train.validate: {"loss", "ce", "mse",
    "x0_err": 5 t-bins}) with NaN (an empty t-bin) as None, so that eval.json stays JSON; None where it has none."""
    val = json.loads(json.dumps(ckpt["val"]).replace("NaN", "null")) if ckpt.get("val") else {}
    return {"ce": None, "mse": None, "x0_err": None, **val, "params": sum(p.numel() for p in model.parameters())}


# -----------------------------------------------------------------------------
# Part 4: every system on the first n test dialogues: the tables, eval.json, eval.png, report.html (skim)

@dataclass
class EvalConfig:
    ckpt: list = opt(None, "checkpoint written by train.py (required unless --bench); repeat it to add others (out/dense/ckpt.pt)")
    n: int = opt(60, "test dialogues: the first n of StoryGen-Eval-toy", lo=1)
    data_dir: str = opt("data", "the dataset whose test split is read (as train.py wrote it)")
    out_dir: str = opt("out", "where eval.json, eval.png, report.html, bench.json and the cached judge.pt go")
    sampler: str = opt("dpmpp", "DPM-Solver++(2M) on a Karras schedule, or DDIM", choices=tuple(SAMPLERS))
    steps: int = opt(25, "diffusion steps per audio span", lo=1, hi=1000)
    cfg: float = opt(3.0, "classifier-free guidance scale (1 = none)", lo=0.0, hi=20.0)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N | mps")
    report_n: int = opt(4, "dialogues shown turn by turn in OUT_DIR/report.html (0 = no report)", lo=0)
    bench: bool = opt(False, "time the model's parts instead (Part 5): tables + OUT_DIR/bench.json; uses the first --ckpt if any")

def system_names(paths):
    """The first checkpoint is `audiochat`, each other `audiochat_<its directory>` (out/dense/ckpt.pt:
    audiochat_dense), numbered when that name is taken."""
    names = ["audiochat"]
    for k, path in enumerate(paths[1:], start=1):
        name = "audiochat_" + os.path.basename(os.path.dirname(os.path.abspath(path)))
        names.append(f"{name}_{k}" if name in names else name)
    return names

def fmt(x, digits=1):
    """A number as a table cell, `digits` decimals; None (not applicable, nothing to measure) -> "–"."""
    return "–" if x is None else f"{x:.{digits}f}"

def result_tables(results):
    """eval.json -> the paper's tables and the models' diagnostics: [(title, header, rows of cells)]."""
    systems, models, listening, n = results["systems"], results["val"], results["listening"], results["n"]
    story, edits = ({k: r[part] for k, r in systems.items()} for part in ("storytelling", "editing"))
    counts = {kind: e["n"] for kind, e in next(iter(edits.values())).items()}   # edit turns per kind, as every system saw
    tasks = [t for t in ("transcribe", "describe") if any(t in p for p in listening.values())]
    return [
        (f"Storytelling (paper Table 2), {n} dialogues",
         ["system", "multiFLAM ↑", "KAD ↓", "planValidity ↑", "planRecall ↑", "latency_s ↓", "rtf ↓"],
         [[k, fmt(s["multiFLAM"]), fmt(s["KAD"], 2), fmt(s["planValidity"]), fmt(s["planRecall"]), fmt(s["latency_s"], 2),
           fmt(s["rtf"], 2)] for k, s in story.items() if not k.endswith(FROM_TRUTH)]),
        (f"Editing (paper Tables 1 and 5; {FROM_TRUTH[1:]}: each edit from ground truth's audio, not its own)",
         ["system", "KAD ↓", "deltaMultiFLAM ↓", "editFLAM ↑", "planValidity ↑"],
         [[k, fmt(e["KAD"], 2), fmt(e["deltaMultiFLAM"]), fmt(e["editFLAM"]), fmt(e["planValidity"])]
          for k, e in ((k, e["overall"]) for k, e in edits.items())]),
        ("Editing per sub-task: editFLAM ↑ / deltaMultiFLAM ↓", ["system", *(f"{e} (n={counts[e]})" for e in EDIT_KINDS)],
         [[k, *(f"{fmt(r[e]['editFLAM'])} / {fmt(r[e]['deltaMultiFLAM'])}" for e in EDIT_KINDS)] for k, r in edits.items()]),
        ("Understanding (paper Table 3; pastEnd: % of answers placing sound past the clip's end)",
         ["system", "tcpWER ↓", "captionMultiFLAM ↑", "pastEnd ↓"],
         [[k, *(fmt(r["understanding"][m]) for m in ("tcpWER", "captionMultiFLAM", "pastEnd"))] for k, r in systems.items()
          if not k.endswith(FROM_TRUTH)]),
        (f"Why the models' plans fail: story / edit turns per PlanError kind (of {n} / {counts['overall']})",
         ["system", *PLAN_ERROR_KINDS],
         [[k, *(f"{story[k]['planFailures'][e]} / {edits[k]['overall']['planFailures'][e]}" for e in PLAN_ERROR_KINDS)]
          for k in models if story[k]["planFailures"]]),
        ("The checkpoint's last validation (train.py): x̂₀ error = σ² v-MSE / mean x₀² of audio spans at noise level "
         "t in [0.8, 1] (1 = no better than x̂₀ = 0, the average sound)",
         ["system", "parameters", "val CE ↓", "val v-MSE ↓", "x̂₀ error ↓"],
         [[k, f"{v['params'] / 1e6:.2f}M", fmt(v["ce"], 3), fmt(v["mse"], 3), fmt(v["x0_err"] and v["x0_err"][-1], 2)]
          for k, v in models.items()]),
        ("Does the model listen? The listening gap: how much the clip lowers the true answer's cross-entropy (nats per "
         "token) against the average sound in its place (0: the answer ignores the audio); in brackets, the two CEs",
         ["system", *tasks],
         [[k, *[f"{fmt(p[t]['ce_without_clip'] - p[t]['ce_clip'], 3)} "
                f"({fmt(p[t]['ce_clip'], 3)} / {fmt(p[t]['ce_without_clip'], 3)}, n={p[t]['n']})" if t in p else "–"
                for t in tasks]] for k, p in listening.items()]),
        ("Requests as people write them (eval.HELDOUT, wording no template uses), through sample.Chat",
         ["system", "story plans naming every asked source ↑", "edits making the asked change ↑"],
         [[k, f"{fmt(h['storySources'])} (n={h['n'][0]})", f"{fmt(h['editsDone'])} (n={h['n'][1]})"]
          for k, h in results["heldout"].items()])]
def table_note(results):
    return (f"Rates in %. Judge (FLAM-lite) held-out frame F1: {results['judge']['frameF1']:.1f} %. KAD against the ground "
            "truth's audio (judge embeddings). Ground-truth and cascade latency time only the simulator's rendering; the "
            "cascades reuse audiochat's plans and answer no understanding requests (–).")

def markdown(title, header, rows):
    """A titled markdown table: header (column names), rows (lists of cells) -> lines."""
    return (["", f"### {title}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])

def plot(results, path):
    """eval.png: a bar chart per main metric, one bar per system, its value written on it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("storytelling", "multiFLAM", "story multiFLAM ↑"), ("storytelling", "KAD", "story KAD ↓"),
              ("editing", "editFLAM", "editFLAM ↑"), ("editing", "deltaMultiFLAM", "deltaMultiFLAM ↓"),
              ("understanding", "tcpWER", "tcpWER ↓"), ("understanding", "captionMultiFLAM", "caption multiFLAM ↑")]
    names = list(results["systems"])
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (section, key, title) in zip(axes.flat, panels):
        values = [(r[section]["overall"] if section == "editing" else r[section])[key] for r in results["systems"].values()]
        bars = ax.bar(range(len(names)), [v or 0 for v in values], color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, [fmt(v, 2 if key == "KAD" else 1) for v in values], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

REPORT_CSS = """
body { font-family: sans-serif; max-width: 1500px; margin: auto; } td, th { border: 1px solid #ccc; padding: 0.3em; }
table { border-collapse: collapse; } .user { background: #eef4ff; padding: 0.5em; margin: 1em 0 0.5em; }
.turn { display: grid; grid-template-columns: repeat(3, 1fr); gap: 1em; } .error { color: #b00; }
.system { border: 1px solid #ddd; padding: 0.5em; min-width: 0; } .system img, audio { width: 100%; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 0.78em; }
"""

def report_cell(title, turn, media_dir, stem):
    """One system's turn (a sample.Turn) -> HTML: its text (tool calls, or an answer) and the studio's plan, then
    where it made audio a player and the picture of it, written into media_dir as stem.wav and stem.png."""
    import soundfile as sf
    text = turn.text + ("\n\nstudio:\n" + plan_to_text(turn.plan) if turn.plan else "")
    html = f'<div class="system"><h4>{escape(title)}</h4><pre>{escape(text)}</pre>'
    if turn.error:
        html += f'<p class="error">{escape(turn.error)}: no audio</p>'
    if turn.wav is not None:
        sf.write(os.path.join(media_dir, stem + ".wav"), turn.wav.T, SR, subtype="PCM_16")
        plot_story(turn.wav, turn.plan, os.path.join(media_dir, stem + ".png"))
        src = f"{os.path.basename(media_dir)}/{stem}"
        html += f'<audio controls preload="none" src="{src}.wav"></audio><img loading="lazy" src="{src}.png">'
    return html + "</div>"

def write_report(results, showcase, ckpt_paths, out_dir):
    """out_dir/report.html, its wavs and pictures in out_dir/report/: the tables, eval.png and the loss curves,
    then each showcase dialogue ([(Episode, {system: run})]) turn by turn: the user's words, and for ground_truth,
    audiochat and cascade side by side the plan, a player and the spectrogram with the plan's timeline."""
    media = os.path.join(out_dir, "report")
    os.makedirs(media, exist_ok=True)
    html = ["<!doctype html><html><head><meta charset='utf-8'><title>AudioChat-mini report</title>"
            f"<style>{REPORT_CSS}</style></head><body><h1>AudioChat-mini on StoryGen-Eval-toy</h1><p>{results['n']} test "
            f"dialogues; checkpoint(s): {escape(', '.join(ckpt_paths))}. Each dialogue: a story, one or two edits (each "
            "conditioned on the system's own previous audio), and an understanding request about a fresh clip.</p>"
            "<h2>Results</h2>"]
    for title, header, rows in result_tables(results):
        html += [f"<h3>{escape(title)}</h3><table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]
        html += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows] + ["</table>"]
    html.append(f"<p>{escape(table_note(results))}</p><img src='eval.png' style='max-width:100%'>")
    for k, path in enumerate(ckpt_paths):
        log = os.path.join(os.path.dirname(os.path.abspath(path)), "log.csv")
        if os.path.exists(log):
            plot_losses(log, os.path.join(media, f"loss_{k}.png"))
            html.append(f"<h3>Training curves: {escape(path)}</h3><img src='report/loss_{k}.png' style='max-width:100%'>")
    systems = [("ground_truth", "ground truth (simulator)"), ("audiochat", "AudioChat-mini"),
               ("cascade", "cascade (model's plan, simulator's tools)")]
    for d, (ep, runs) in enumerate(showcase):
        html.append(f"<h2>Dialogue {d + 1} (seed {ep.seed})</h2>")
        for k, request in enumerate([ep.story, *ep.edits]):
            what = f"edit {k}" if k else "story"
            html.append(f"<div class='user'><b>user ({what}):</b> {escape(request['text'])}</div><div class='turn'>")
            html += [report_cell(title, runs[name]["turns"][k], media, f"d{d}_t{k}_{name}")
                     for name, title in systems] + ["</div>"]
        html.append(f"<div class='user'><b>user (understanding):</b> {escape(ep.request)}</div><div class='turn'>")
        clip = Turn(ep.request, ep.scene, render(ep.scene, ep.scene_seed))
        html.append(report_cell("the clip (and its true plan)", clip, media, f"d{d}_clip"))
        html += [f"<div class='system'><h4>{escape(title)}</h4><pre>{escape(runs[name]['answer'].text)}</pre></div>"
                 for name, title in systems[:2]] + ["</div>"]   # the cascade understands no audio: no answer
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write("\n".join(html + ["</body></html>"]))

def evaluate(config):
    """Run every system on the first config.n test dialogues of config.data_dir, print the tables, write
    eval.json, eval.png and report.html into config.out_dir -> the eval.json dict: {"judge", "n",
    "systems": {name: aggregate}, "val": {model: checkpoint_val}, "listening": {model: listening_profile},
    "heldout": {model: run_heldout}}."""
    episodes, device = load_episodes(config.data_dir, config.n), pick_device(config.device)
    models = dict(zip(system_names(config.ckpt), [load_checkpoint(path, device) for path in config.ckpt]))   # bad paths fail first
    judge = load_or_train_judge(os.path.join(config.out_dir, "judge.pt"))
    print(f"judge (FLAM-lite): held-out frame F1 {judge.info['frameF1']:.1f} %")
    first, *others = models
    records = {name: [] for name in ["ground_truth", first, "cascade", "cascade_no_context", *others, first + FROM_TRUTH]}
    showcase = []   # the first report_n dialogues' runs, for report.html
    for i, ep in enumerate(tqdm(episodes, desc="eval", unit="dialogue")):
        runs = {"ground_truth": run_ground_truth(ep)}
        runs.update({name: run_audiochat(model, tok, codec, ep, config) for name, (model, tok, codec, _) in models.items()})
        runs["cascade"] = run_cascade(runs[first], ep)   # the cascades render the first model's plans
        runs["cascade_no_context"] = run_cascade(runs[first], ep, context=False)
        runs[first + FROM_TRUTH] = run_from_truth(*models[first][:3], ep, config, runs["ground_truth"])
        for name, run in runs.items():
            records[name].append(score_episode(judge, ep, run))
        if i < config.report_n:
            showcase.append((ep, runs))
    tasks = [ep.task for ep in episodes]
    results = {"judge": {"frameF1": judge.info["frameF1"]}, "n": len(episodes),
               "systems": {name: aggregate(rs, None if name == "ground_truth" else records["ground_truth"])
                           for name, rs in records.items()},
               "val": {name: checkpoint_val(model, ckpt) for name, (model, *_, ckpt) in models.items()},
               "listening": {name: listening_profile(model, load_dataset(config.data_dir, "test", tok, codec, cot=model.config.cot)
                                                     [:len(tasks)], tasks) for name, (model, tok, codec, _) in models.items()},
               "heldout": {name: run_heldout(model, tok, codec, config) for name, (model, tok, codec, _) in models.items()
                           if model.config.cot}}
    for part in ("storytelling", "understanding"):   # Table 5's system tells no story of its own and answers nothing
        results["systems"][first + FROM_TRUTH][part] = dict.fromkeys(results["systems"][first + FROM_TRUTH][part])
    print("\n".join([line for table in result_tables(results) for line in markdown(*table)][1:] + ["", table_note(results)]))
    with open(os.path.join(config.out_dir, "eval.json"), "w") as f:   # out_dir holds judge.pt: it exists
        json.dump(results, f, indent=1)
    plot(results, os.path.join(config.out_dir, "eval.png"))
    if showcase:
        write_report(results, showcase, config.ckpt, config.out_dir)
    print(f"wrote eval.json, eval.png{', report.html (+ report/)' if showcase else ''} into {config.out_dir}")
    return results


# -----------------------------------------------------------------------------
# Part 5: the speed bench (python eval.py --bench) (skim)
#
# The README's Performance table, timed on the current device: each fast path beside a short baseline written
# here (a training step beside the same layers as a plain causal LM under the same per-document mask; decoding
# and audio sampling through their caches beside re-running everything), and real-time factors (a sample.Chat
# story turn; the toy cascade's simulator), on the first test dialogues of --data_dir, encoded as in training.

BENCH_DIALOGUES, DECODE_TOKENS, SAMPLER_STORIES, E2E_STORIES = 16, 100, 4, 3
SAMPLER_RUNS = (("ddim", 150), ("dpmpp", 10), ("dpmpp", 15), ("dpmpp", 25))

def causal_lm_loss(model, tokens, doc_id):
    """The training row's baseline, model's layers as a plain GPT: tokens, doc_id (B, L) -> the mean
    next-token cross-entropy, every block under the causal mask within each document (as model.forward
    masks a packed batch without audio); no audio embedding, noise level, token shift or diffusion head.
    Positions run on across documents: rotary attention sees only distances within a document."""
    text, backend = torch.full_like(tokens, -1), model.backend   # no audio span: the rule is the causal mask
    mask = (flex_block_mask(text, doc_id) if backend == "flex" else document_split(text, doc_id) if backend == "sdpa"
            else transfusion_mask(text, doc_id))
    x, rope = model.wte(tokens), model.rope(torch.arange(tokens.size(1), device=tokens.device))
    for block in model.blocks:
        x, _ = block(x, mask, backend, rope, text >= 0)
    return F.cross_entropy(model.text_head(x)[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())

def step_flops(model, batch):
    """Model FLOPs of one training step (forward and backward) on a collated batch, PaLM's count as in
    nanoGPT's estimate_mfu: 6 per weight a token passes (MoT: one copy of each layer) per token, plus
    12 n_layer n_embd per (query, key) pair, the pairs counted inside each packed document (nanoGPT
    counts the whole block). A document of n tokens has n^2 pairs, the sum of 2 p + 1 over its positions p."""
    c, real = model.config, batch["doc_id"] >= 0
    weights = sum(p.numel() for name, p in model.named_parameters() if ".audio." not in name)
    pairs = int((2 * document_positions(batch["doc_id"]) + 1)[real].sum())
    return 6 * weights * int(real.sum()) + 12 * (c.n_layer + c.n_gen_layer) * c.n_embd * pairs

def bench_training(model, seqs, tok, batch_size, device, repeats):
    """Seconds per training step (forward, backward, AdamW) of a fresh model of model's shape on rows packed
    as train.py packs them: with transfusion_forcing_loss and with causal_lm_loss on the same tokens and
    document mask, in the precision train.py would pick here (pick_dtype); the AudioChat step in the other
    precision too (CUDA and CPU), and its MFU: step_flops per second against a square matmul's FLOP/s in
    its precision -> {"audiochat_s", "causal_lm_s", "slowdown": their ratio, "float32_s", "bfloat16_s",
    "dtype", "model_flops_per_s", "matmul_peak_flops_per_s", "mfu", "batch": [B, L], "attn"}."""
    torch.manual_seed(0)
    model = AudioChatModel(model.config).to(device)
    rows = sorted(pack(seqs, model.config.block_size, 0), key=lambda r: -sum(len(seqs[i]["tokens"]) for i in r))
    rows = [rows[i % len(rows)] for i in range(batch_size)]   # the fullest rows: a full dataset packs them tight
    batch = {k: v.to(device) for k, v in collate([[seqs[i] for i in r] for r in rows], tok.special("<|pad|>")).items()}
    optimizer, g = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device.split(":")[0]), torch.Generator().manual_seed(0)
    losses = {"audiochat": lambda: transfusion_forcing_loss(model, batch, tok.special("<|null|>"), generator=g)[0],
              "causal_lm": lambda: causal_lm_loss(model, batch["tokens"], batch["doc_id"])}
    def step(loss_fn, dtype):
        with autocast_for(device, dtype):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    dtype = pick_dtype("auto", device, model.config.n_embd)
    s = {f"{k}_s": median_time(lambda: step(fn, dtype), device, repeats) for k, fn in losses.items()}
    if device.startswith(BF16_DEVICES):   # the other precision, for the bench's float32 / bf16 row
        other = "float32" if dtype == "bfloat16" else "bfloat16"
        s[f"{other}_s"] = median_time(lambda: step(losses["audiochat"], other), device, repeats)
    n = 4096 if device.startswith("cuda") else 2048   # a square matmul: the peak an MFU is measured against
    achieved, peak = step_flops(model, batch) / s["audiochat_s"], matmul_flops(device, dtype, n, n, n)
    return {**s, f"{dtype}_s": s["audiochat_s"], "slowdown": s["audiochat_s"] / s["causal_lm_s"], "dtype": dtype,
            "model_flops_per_s": achieved, "matmul_peak_flops_per_s": peak, "mfu": achieved / peak,
            "batch": list(batch["tokens"].shape), "attn": model.backend}

@torch.no_grad()
def recompute_decode(model, prompt, n, stop):
    """The decoding row's baseline: greedy decoding without a cache, every token re-running the text
    layers (layers="text", as the cached path) over the whole sequence. prompt: a list of ids -> the ids
    decoded: n, or fewer ending with the first id in stop."""
    dev, ids = model.wte.weight.device, list(prompt)
    for _ in range(n):
        L = len(ids)
        logits, _ = model(torch.tensor([ids], device=dev), torch.zeros(1, L, model.config.latent_dim, device=dev),
                          torch.zeros(1, L, device=dev), torch.full((1, L), -1, device=dev), layers="text")
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]

def bench_decoding(model, tok, codec, ep, seq, device, repeats):
    """Seconds of sample.Chat's greedy decoding of a story request (a token per step through the KV cache, no
    guidance row) and of recompute_decode after the same ids (train.load_dataset's, to the first <|assistant|>),
    by a random model of model's shape: it ends no plan, so it samples no audio
    -> {"kv_cache_s", "recompute_s", "speedup": their ratio, "tokens": [in the request, decoded]}."""
    torch.manual_seed(0)
    twin = AudioChatModel(model.config).to(device).eval()
    prompt = seq["tokens"][:int((seq["tokens"] == tok.special("<|assistant|>")).nonzero()[0]) + 1].tolist()
    stop = {tok.special(s) for s in ("<|tool|>", "<|audio|>", "<|end|>")}   # where Chat's decoding stops
    n = len(recompute_decode(twin, prompt, DECODE_TOKENS, stop))
    s = {"kv_cache_s": median_time(lambda: Chat(twin, tok, codec, cfg_scale=1.0, max_new_tokens=DECODE_TOKENS)
                                   .generate(ep.story["text"]), device, repeats),   # a new Chat: a new dialogue
         "recompute_s": median_time(lambda: recompute_decode(twin, prompt, n, ()), device, repeats)}
    return {**s, "speedup": s["recompute_s"] / s["kv_cache_s"], "tokens": [len(prompt), n]}

def prefix_rows(seq, span, null_id, device):
    """An encode_dialogue sequence before its audio span `span` (its <|audio|> included) as sample.Chat's
    cache holds it -> ((tokens, audio, t, span_id) of R rows, the span's length). R = 2 with a null_id:
    the second row has its words replaced by <|null|> (classifier-free guidance); else R = 1."""
    where = (seq["span_id"] == span).nonzero()[:, 0]
    T, tokens = int(where[0]), seq["tokens"][:int(where[0])]
    tokens = torch.stack([tokens] if null_id is None else [tokens, torch.where(seq["is_plain_text"][:T], null_id, tokens)])
    R = len(tokens)
    return [z.to(device) for z in (tokens, seq["audio"][None, :T].expand(R, -1, -1), torch.zeros(R, T),
                                   seq["span_id"][None, :T].expand(R, -1))], len(where)

@torch.no_grad()
def sample_after(model, prefix, n, steps, sampler, cfg_scale, generator, cached=True):
    """The n-token audio span after `prefix` (prefix_rows) -> x0 (1, n, latent). cached: the prefix runs
    once (model.extend), then diffusion.sample_audio steps on the span alone, as sample.Chat does; else (the
    audio row's baseline) each denoiser call re-runs model.forward over prefix and span. The same x0 either way."""
    tokens, audio, t, span_id = prefix
    if cached:
        cache = model.new_cache(len(tokens))
        model.extend(cache, tokens, audio, t, span_id, layers="all")
        return sample_audio(model, cache, n, steps, sampler, cfg_scale, generator)
    R, T = tokens.shape
    tokens, span_id = F.pad(tokens, (0, n)), F.pad(span_id, (0, n), value=int(span_id.max()) + 1)
    def v_fn(x, t_now):
        x_all, t_all = torch.cat([audio, x.expand(R, -1, -1)], 1), torch.cat([t, t_now[:, None].expand(R, n)], 1)
        v = model(tokens, x_all, t_all, span_id)[1][:, T:].float()
        return cfg(v[:1], v[1:], cfg_scale) if R == 2 else v
    return SAMPLERS[sampler](v_fn, rand((1, n, model.config.latent_dim), generator, tokens.device, normal=True), steps)

def bench_prefix_cache(model, tok, seqs, config, device, repeats):
    """Seconds to sample each assistant audio span of the test dialogue with the most (the story, then its edits,
    each after all said and heard before it) with the prefix cache and without, at config's sampler, steps and
    guidance -> {"rows": [{"context_tokens", "audio_tokens", "cached_s", "recompute_s", "speedup"}], turn by turn}.
    A step still runs the span through every layer: the saving is <= (context + audio) / audio."""
    seq = max(seqs, key=lambda s: int(s["span_is_target"].sum()))
    null_id, rows = tok.special("<|null|>") if config.cfg != 1 else None, []
    for span in seq["span_is_target"].nonzero()[:, 0].tolist():
        prefix, n = prefix_rows(seq, span, null_id, device)
        def seconds(cached):   # the same noise each call: the same x0 either way
            return median_time(lambda: sample_after(model, prefix, n, config.steps, config.sampler, config.cfg,
                                                    torch.Generator(device).manual_seed(0), cached), device, repeats)
        cached_s, recompute_s = seconds(True), seconds(False)
        rows.append({"context_tokens": prefix[0].shape[1], "audio_tokens": n, "cached_s": cached_s,
                     "recompute_s": recompute_s, "speedup": recompute_s / cached_s})
    return {"rows": rows}

def bench_samplers(model, tok, codec, judge, episodes, seqs, config, device):
    """Each SAMPLER_RUNS sampler on the first SAMPLER_STORIES stories, the true plan in context (the sampler
    alone), the same noise -> {"stories", "rows": [{"sampler", "steps", "seconds" per story, "multiFLAM", "stderr"}]}."""
    null_id, rows = tok.special("<|null|>") if config.cfg != 1 else None, []
    prefixes = [prefix_rows(seq, 0, null_id, device) for seq in seqs[:SAMPLER_STORIES]]
    sample_after(model, *prefixes[0], 2, "dpmpp", config.cfg, None)   # warm-up: one-off costs are not a sampler's
    for sampler, steps in SAMPLER_RUNS:
        seconds, scores = [], []
        for ep, (prefix, n) in zip(episodes, prefixes):
            t0, g = time.perf_counter(), torch.Generator(device).manual_seed(ep.seed)
            x0 = sample_after(model, prefix, n, steps, sampler, config.cfg, g)[0].float().cpu()   # .cpu() waits for it
            seconds.append(time.perf_counter() - t0)
            scores.append(multiflam(judge, codec.decode(AudioCodec.unpatchify(x0)).numpy(), ep.story["plan"]))
        rows.append({"sampler": sampler, "steps": steps, "seconds": mean(seconds), "multiFLAM": mean(scores),
                     "stderr": float(np.std(scores, ddof=min(1, len(scores) - 1)) / np.sqrt(len(scores)))})
    return {"stories": len(prefixes), "rows": rows}

def bench_end_to_end(model, tok, codec, episodes, config):
    """A story turn of sample.Chat.generate (plan, audio, codec) for each of the first E2E_STORIES requests, next to
    the simulator rendering the true plan from scratch (the toy cascade's tools, as the paper sets AudioChat next to
    WavJourney) -> {"stories", "with_audio": how many plans held, "story_s", "render_s": mean seconds per story,
    "rtf", "render_rtf": seconds per second of audio (rtf: None when no plan held)}."""
    chat, simulator = [], []
    for ep in episodes[:E2E_STORIES]:
        chat.append(Chat(model, tok, codec, sampler=config.sampler, steps=config.steps, cfg_scale=config.cfg,
                         seed=ep.seed).generate(ep.story["text"]))   # its seconds end with the audio on the CPU
        dry_signal.cache_clear()   # from scratch: no sound cached by an earlier story
        simulator.append(rendered(Turn(ep.story["calls"], ep.story["plan"]), ep.seed))
    def rtf(turns):   # seconds per second of audio, over the turns that made some
        return sum(t.seconds for t in turns) / sum(t.wav.shape[1] / SR for t in turns) if turns else None
    made = [t for t in chat if t.wav is not None]
    return {"stories": len(chat), "with_audio": len(made), "story_s": mean(t.seconds for t in made),
            "render_s": mean(t.seconds for t in simulator), "rtf": rtf(made), "render_rtf": rtf(simulator)}

def bench_table(results):
    """bench.json -> the README's Performance table with this run's figures: [[what, figure]]."""
    training, decoding, spans, samplers, e2e = (results[k] for k in ("training", "decoding", "prefix_cache", "samplers",
                                                                     "end_to_end"))
    (B, L), (asked, decoded), sampling = training["batch"], decoding["tokens"], results["sampling"]
    turns = " / ".join(["story", *(f"edit {k}" for k in range(1, len(spans["rows"])))])
    rows = [[f"training step time, AudioChat / a causal LM of the same size, same per-document mask ({B} x {L} tokens, "
             f"{training['attn']} attention, {training['dtype']})", f"{training['slowdown']:.2f}x"],
            [f"training step's model FLOP/s against this device's {training['dtype']} matmul peak (MFU)",
             f"{training['mfu']:.0%} ({training['model_flops_per_s'] / 1e12:.2f} / {training['matmul_peak_flops_per_s'] / 1e12:.2f} TFLOP/s)"],
            ["training step, float32 / bfloat16 autocast (seconds each)", "–" if "bfloat16_s" not in training else
             f"{training['float32_s'] / training['bfloat16_s']:.2f}x ({training['float32_s']:.3f} / {training['bfloat16_s']:.3f} s)"],
            [f"greedy decoding, speed-up from the KV cache ({decoded} tokens after a {asked}-token request)",
             f"{decoding['speedup']:.1f}x"],
            [f"one audio span, speed-up from the prefix cache: {turns} ({sampling})",
             " / ".join(f"{r['speedup']:.1f}x" for r in spans["rows"])]]
    if "skipped" in e2e:
        return rows + [["samplers, end to end", f"skipped: {e2e['skipped']}"]]
    base = samplers["rows"][0]   # DDIM-150: the figures are speed-ups over it
    rows += [[f"{r['sampler']} ({r['steps']} steps) over {base['sampler']} ({base['steps']} steps), time per story; "
              f"its story multiFLAM ↑ ± s.e. ({samplers['stories']} stories, from the true plan)",
              f"{base['seconds'] / r['seconds']:.1f}x; {r['multiFLAM']:.1f} ± {r['stderr']:.1f}"] for r in samplers["rows"]]
    made = f"{e2e['with_audio']} of {e2e['stories']} stories with a valid plan; {sampling}"
    return rows + [[f"end-to-end story turn (Chat.generate), real-time factor; seconds per story ({made})",
                    f"{fmt(e2e['rtf'], 3)}; {fmt(e2e['story_s'], 2)} s"],
                   ["the toy cascade (the simulator renders the plan), real-time factor; seconds per story",
                    f"{fmt(e2e['render_rtf'], 3)}; {fmt(e2e['render_s'], 3)} s"]]

def bench(config, repeats=3, model_overrides=None):
    """The bench's rows on config.device: the table printed, OUT_DIR/bench.json written -> its dict. The model
    is config.ckpt's first checkpoint (then the samplers and end-to-end rows run too, the judge cached in
    OUT_DIR/judge.pt), else (speed does not depend on weights) a random one of train.py's preset size changed
    by model_overrides (TrainConfig fields), with the dataset's tokenizer and codec; the rows that need a trained
    model are skipped. repeats: timed calls per figure, after a warm-up."""
    t_start, device = time.perf_counter(), pick_device(config.device)
    episodes, train_config = load_episodes(config.data_dir, BENCH_DIALOGUES), parse_config(TrainConfig, [], PRESETS)
    if config.ckpt:
        model, tok, codec, ckpt = load_checkpoint(config.ckpt[0], device)
        train_config.batch_size = ckpt["config"].get("batch_size", train_config.batch_size)
    vars(train_config).update(model_overrides or {})
    if not config.ckpt:
        tok, codec = load_tokenizers(config.data_dir)
        torch.manual_seed(0)
        model = AudioChatModel(model_config(train_config, tok.vocab_size)).to(device).eval()
    seqs = load_dataset(config.data_dir, "test", tok, codec, cot=model.config.cot)[:BENCH_DIALOGUES]
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{device} ({os.cpu_count()} cores)"
    what = config.ckpt[0] if config.ckpt else "random, preset size"
    print(f"speed bench on {name}, torch {torch.__version__}; model: {what}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    results = {"device": name, "sampling": f"{config.sampler} {config.steps} steps, CFG {config.cfg:g}",
               "training": bench_training(model, seqs, tok, train_config.batch_size, device, repeats),
               "decoding": bench_decoding(model, tok, codec, episodes[0], seqs[0], device, repeats),
               "prefix_cache": bench_prefix_cache(model, tok, seqs, config, device, repeats)}
    if config.ckpt:
        judge = load_or_train_judge(os.path.join(config.out_dir, "judge.pt"))
        results["samplers"] = bench_samplers(model, tok, codec, judge, episodes, seqs, config, device)
        results["end_to_end"] = bench_end_to_end(model, tok, codec, episodes, config)
    else:
        results["samplers"] = results["end_to_end"] = {"skipped": "they need a trained model: --ckpt out/ckpt.pt"}
    print("\n".join(markdown(f"Speed ({name})", ["what", "this run"], bench_table(results))))
    os.makedirs(config.out_dir, exist_ok=True)
    with open(os.path.join(config.out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nbench took {time.perf_counter() - t_start:.0f} s; wrote {os.path.join(config.out_dir, 'bench.json')}")
    return results


def main(argv):
    config = parse_config(EvalConfig, argv)
    if not (config.bench or config.ckpt):
        sys.exit("error: give a checkpoint: python eval.py --ckpt out/ckpt.pt (repeat --ckpt to compare several)")
    (bench if config.bench else evaluate)(config)


if __name__ == "__main__":
    main(sys.argv[1:])
