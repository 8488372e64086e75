"""
Every test of AudioChat-mini, in one file, in the order of the lecture:
the toy world, the tokenizers, the model, the loss and samplers, training, chat, evaluation.

    python test_all.py            # runs everything on a CPU in a few minutes, ends "N passed, M failed"
    python test_all.py codec bpe  # only the tests whose name contains one of these words
    python -m pytest test_all.py  # the same tests under pytest

Each test is a plain function with plain asserts: it checks a known answer, an equivalence
(backends, caches), a property (of a metric, of an edit), or that a command really runs.
No test is timed: speed is measured by `python eval.py --bench`, never asserted here.
"""
import os
import sys
import time
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")  # the suite is sized for a 2-core machine
os.environ.setdefault("TQDM_DISABLE", "1")     # progress bars are for people, not for the test log
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import copy
import itertools
import json
import random
import re
import types
import warnings

import eval as E

from simulate_data import (AMBIENCES, EDIT_KINDS, LISTENING_TURNS, MUSIC, SFX, SPLIT_SEEDS, SR, VOCAB, VOICES,
                           WORD_CODES, PlanError, Studio, caption, dialogue_text, dry_signal, make_dialogue,
                           make_listening_dialogue, plan_from_text, plan_to_text, render, speech_duration,
                           synth_speech, transcript, validate_plan)
from tokenizer import (BPETokenizer, AudioCodec, encode_dialogue, SPECIAL_TOKENS, HOP, FRAME_RATE,
                       N_MELS, PATCH, LATENT_DIM)
from model import AudioChatModel, ModelConfig, span_positions, transfusion_mask
from diffusion import (add_noise, alpha_sigma, cfg, collate, ddim_sample, dpmpp_2m_sample, sample_audio,
                       sample_noise_levels, shift_noise_level, transfusion_forcing_loss)

TMP = tempfile.mkdtemp(prefix="audiochat_test_")  # scratch space shared by the tests of one run


# -----------------------------------------------------------------------------
# the toy audio world (simulate_data.py)

def _good_plan():
    return {"duration": 5.0, "sources": [
        {"id": 1, "type": "speech", "voice": "ava", "text": "the old dog runs home", "start": 0.4,
         "dur": speech_duration("ava", "the old dog runs home"), "gain_db": 0, "pan": -0.4},
        {"id": 2, "type": "sfx", "sound": "dog_bark", "start": 2.6, "dur": 0.5, "gain_db": -4, "pan": 0.6},
        {"id": 3, "type": "ambience", "sound": "rain", "start": 0.0, "dur": 5.0, "gain_db": -20, "pan": 0.0},
        {"id": 4, "type": "music", "sound": "piano", "start": 0.0, "dur": 5.0, "gain_db": -22, "pan": 0.0}]}


def _expect_error(plan, *words):
    try:
        validate_plan(plan)
    except PlanError as e:
        msg = str(e)
        assert all(w in msg for w in words), f"message {msg!r} should mention {words}"
        return
    raise AssertionError(f"plan should have been rejected ({words})")


def test_plan_validation_messages():
    validate_plan(_good_plan())
    cases = [  # (mutation, words the message must contain)
        (lambda p: p["sources"][0].update(voice="zed"), ("source 1", "unknown voice", "zed")),
        (lambda p: p["sources"][0].update(text="the old dragon"), ("source 1", "unknown word", "dragon")),
        (lambda p: p["sources"][1].update(sound="meteor"), ("source 2", "unknown sfx sound", "meteor")),
        (lambda p: p["sources"][2].update(sound="dog_bark"), ("source 3", "unknown ambience sound")),
        (lambda p: p["sources"][1].update(type="noise"), ("source 2", "unknown type")),
        (lambda p: p["sources"][1].update(start=4.8), ("source 2", "after the story's end")),
        (lambda p: p["sources"][1].update(start=-0.5), ("source 2", "before the story begins")),
        (lambda p: p["sources"][1].update(dur=0.9), ("source 2", "dur 0.9", "lasts 0.5")),
        (lambda p: p["sources"][0].update(dur=9.9), ("source 1", "dur", "lasts")),
        (lambda p: p["sources"].append(dict(p["sources"][0], id=5, start=0.9, pan=0.0)), ("source 5", "ava", "talks over")),
        (lambda p: p["sources"][3].update(id=1), ("source 1", "duplicate id")),
        (lambda p: p["sources"][3].update(id=0), ("id must be a positive integer",)),
        (lambda p: p["sources"][1].update(gain_db=12), ("source 2", "gain_db 12", "outside")),
        (lambda p: p["sources"][1].update(gain_db=-3.5), ("source 2", "gain_db must be an integer")),
        (lambda p: p["sources"][1].update(pan=1.5), ("source 2", "pan 1.5", "outside")),
        (lambda p: p["sources"][1].update(start=1.25), ("source 2", "start", "0.1 grid")),
        (lambda p: p["sources"][1].pop("pan"), ("source 2", "exactly the keys")),
        (lambda p: p.update(duration=12.0), ("duration 12.0", "outside")),
        (lambda p: p.update(duration=5.05), ("duration", "0.1 s grid")),
        (lambda p: p.pop("sources"), ('"duration" and "sources"',)),
    ]
    for mutate, words in cases:
        p = json.loads(json.dumps(_good_plan()))
        mutate(p)
        _expect_error(p, *words)
    try:
        plan_from_text('{"duration": 5.0, "sources": [')
        raise AssertionError("bad JSON accepted")
    except PlanError as e:
        assert "not valid JSON" in str(e)


def test_studio_rejects_unknown_ids_and_keeps_plan():
    st = Studio(seed=0, plan=_good_plan())
    before = plan_to_text(st.plan)
    for name, args in [("remove", {"id": 9}), ("set_gain", {"id": 7, "gain_db": -3}), ("set_pan", {"id": 8, "pan": 0.5}),
                       ("replace", {"id": 6, "sound": "bell"})]:
        try:
            st.call(name, args)
            raise AssertionError(f"{name} of a missing id accepted")
        except PlanError as e:
            assert "no source with id" in str(e) and name in str(e), str(e)
    try:  # a valid id, but the result would be invalid: rejected, and nothing changes
        st.call("set_gain", {"id": 2, "gain_db": 40})
        raise AssertionError("gain 40 accepted")
    except PlanError as e:
        assert "source 2" in str(e)
    assert plan_to_text(st.plan) == before
    # ids are never reused, even after the highest one is removed
    st.call("remove", {"id": 4})
    assert st.call("sfx", {"sound": "bell", "start": 1.0, "gain_db": -6, "pan": 0.0}) == 5


def test_plan_text_round_trip():
    p = _good_plan()
    text = plan_to_text(p)
    assert "\n" not in text and text.startswith('{"duration":5.0,"sources":[{"id":1,"type":"speech","voice":"ava"')
    assert plan_from_text(text) == p
    assert plan_to_text(plan_from_text(text)) == text
    for seed in range(5):  # and every plan the agents make
        d, _ = make_dialogue(seed)
        for t in d["turns"]:
            if "plan" in t:
                assert plan_from_text(plan_to_text(t["plan"])) == t["plan"]


def test_plan_text_leaves_derived_durations_to_the_tools():
    p = _good_plan()
    written = json.loads(plan_to_text(p))["sources"]
    assert ["dur" in s for s in written] == [False, False, True, True]   # speech, sfx derived; beds chosen
    assert plan_from_text(plan_to_text(p))["sources"][0]["dur"] == speech_duration("ava", "the old dog runs home")
    with_dur = json.loads(plan_to_text(p))
    with_dur["sources"][1]["dur"] = 0.5
    for text, words in [(json.dumps(with_dur), ("source 2", "derived")),
                        (plan_to_text(p).replace('home"', 'hoem"'), ("source 1", "unknown word"))]:
        try:
            plan_from_text(text)
            raise AssertionError(f"accepted {text}")
        except PlanError as e:
            assert all(w in str(e) for w in words), str(e)


def test_edits_leave_untouched_stems_identical():
    plan = _good_plan()
    _, before = render(plan, seed=7, stems=True)
    edits = {
        "add": lambda st: st.call("sfx", {"sound": "bell", "start": 1.0, "gain_db": -6, "pan": 0.3}),
        "remove": lambda st: st.call("remove", {"id": 2}),
        "volume": lambda st: st.call("set_gain", {"id": 2, "gain_db": 2}),
        "move": lambda st: st.call("set_pan", {"id": 2, "pan": -0.9}),
        "change sound": lambda st: st.call("replace", {"id": 2, "sound": "knock"}),
        "change voice": lambda st: st.call("replace", {"id": 1, "voice": "ben"}),
        "change bed": lambda st: st.call("replace", {"id": 3, "sound": "wind"}),
    }
    for kind, edit in edits.items():
        st = Studio(seed=7, plan=plan)
        edit(st)
        _, after = render(st.plan, seed=7, stems=True)
        changed = {s["id"] for s in st.plan["sources"] if s not in plan["sources"]} | (set(before) - set(after))
        assert changed, kind
        for sid in set(before) & set(after) - changed:
            assert np.array_equal(before[sid], after[sid]), f"{kind}: stem {sid} changed"
        for sid in changed & set(after) & set(before):
            assert not np.array_equal(before[sid], after[sid]), f"{kind}: stem {sid} should change"
    # and a whole dialogue: every source whose plan entry is unchanged keeps its stem
    d, audios = make_dialogue(3)
    plans = [t["plan"] for t in d["turns"] if t["role"] == "assistant" and "audio" in t]
    stems = [render(p, d["seed"], stems=True)[1] for p in plans]
    for p0, p1, s0, s1 in zip(plans, plans[1:], stems, stems[1:]):
        for src in p1["sources"]:
            if src in p0["sources"]:
                assert np.array_equal(s0[src["id"]], s1[src["id"]])


def test_render_is_deterministic_and_seeded():
    d1, a1 = make_dialogue(11)
    d2, a2 = make_dialogue(11)
    d3, a3 = make_dialogue(12)
    assert json.dumps(d1) == json.dumps(d2)
    assert len(a1) == len(a2) and all(np.array_equal(x, y) for x, y in zip(a1, a2))
    assert json.dumps(d1) != json.dumps(d3)
    p = _good_plan()
    dry_signal.cache_clear()   # the cache must not be what makes it deterministic
    x = render(p, seed=1)
    assert np.array_equal(x, render(p, seed=1)) and not np.array_equal(x, render(p, seed=2))
    assert x.shape == (2, 5 * SR) and x.dtype == np.float32


def test_every_sound_and_voice_renders_cleanly():
    rows = [{"type": "sfx", "sound": s, "dur": L} for s, (L, _) in SFX.items()]
    rows += [{"type": t, "sound": s, "dur": 3.0} for t, names in (("ambience", AMBIENCES), ("music", MUSIC)) for s in names]
    rows += [{"type": "speech", "voice": v, "text": "hello my old friend", "dur": speech_duration(v, "hello my old friend")}
             for v in VOICES]
    for i, r in enumerate(rows):
        plan = {"duration": 4.0, "sources": [{"id": 1, **r, "start": 0.2, "gain_db": 6, "pan": 0.3}]}
        plan["sources"][0] = {k: plan["sources"][0][k] for k in
                              (("id", "type", "voice", "text") if r["type"] == "speech" else ("id", "type", "sound"))
                              + ("start", "dur", "gain_db", "pan")}
        x = render(plan, seed=i)
        name = r.get("sound") or r.get("voice")
        assert np.isfinite(x).all(), name
        assert np.abs(x).max() < 1.0, f"{name} clips"
        active = x[:, int(0.2 * SR): int((0.2 + r["dur"]) * SR)]
        assert np.sqrt(np.mean(active ** 2)) > 0.01, f"{name} is (nearly) silent"
        assert np.abs(x[:, : int(0.2 * SR)]).max() == 0, f"{name} sounds before its start"
    # a dense mix at full gain stays below clipping thanks to the limiter
    loud = _good_plan()
    for s in loud["sources"]:
        s["gain_db"] = 6
    assert np.abs(render(loud, seed=0)).max() < 1.0


def _log_mels(wavs):
    """Left-channel log-mel frames (T, 32) of mono clips, through the project's codec."""
    codec = AudioCodec()
    return [codec.encode_raw(np.stack([w, w]))[:, :32] for w in wavs]


def _word_features(raw, steps=12):
    """(T, 32) -> (steps * 32,): the frames resampled to a fixed number of time steps (words
    differ in length), standardised per clip (so loudness does not help)."""
    r = torch.nn.functional.interpolate(raw.T[None], size=steps, mode="linear", align_corners=True)[0].T
    return ((r - r.mean()) / r.std()).reshape(-1)


def _voice_features(raw):
    """(T, 32) -> (64,): mean and spread of the spectrum over the loud frames (what a word has
    in common with every other word of the same voice)."""
    loud = raw.mean(1) > raw.mean(1).max() - 4
    return torch.cat([raw[loud].mean(0), raw[loud].std(0)])


def _train_classifier(x, y, n_classes, hidden=128, steps=400):
    """A small MLP (full batch, Adam): -> predict(x) -> class ids."""
    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-5
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_classes))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda z: model((z - mean) / std).argmax(-1)


def test_speech_is_learnable():
    """Is the toy language learnable from log-mels? 22 words x 6 voices x 3 seeds, a small MLP:
    - words, trained on ava/ben/cleo/dan, tested on the unseen voices eve and finn: 0.955 measured
      (the misses are vowel confusions, e.g. eve's 'er' heard as 'e');
    - words, trained on seeds 0-1 of all voices, tested on seed 2: 1.00 measured;
    - voices, trained on two thirds of the words, tested on the other words: 0.99 measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors only lose time to thread synchronisation (badly on a busy machine)
    try:
        _speech_is_learnable()
    finally:
        torch.set_num_threads(threads)


def _speech_is_learnable():
    words = VOCAB[::5][:22]                     # 22 words spread over the vocabulary
    keys = [(v, w, s) for v in VOICES for w in words for s in range(3)]
    raws = _log_mels([synth_speech(v, w, np.random.default_rng(s)) for v, w, s in keys])
    xw = torch.stack([_word_features(r) for r in raws])
    xv = torch.stack([_voice_features(r) for r in raws])
    word_y = torch.tensor([words.index(k[1]) for k in keys])
    voice_y = torch.tensor([list(VOICES).index(k[0]) for k in keys])

    def accuracy(x, y, train_mask, n_classes):
        predict = _train_classifier(x[train_mask], y[train_mask], n_classes)
        return (predict(x[~train_mask]) == y[~train_mask]).float().mean().item()

    acc_voices = accuracy(xw, word_y, torch.tensor([k[0] in ("ava", "ben", "cleo", "dan") for k in keys]), len(words))
    acc_seeds = accuracy(xw, word_y, torch.tensor([k[2] < 2 for k in keys]), len(words))
    acc_speaker = accuracy(xv, voice_y, torch.tensor([words.index(k[1]) % 3 != 0 for k in keys]), len(VOICES))
    print(f"speech: word accuracy {acc_voices:.3f} on unseen voices, {acc_seeds:.3f} on unseen seeds; "
          f"voice accuracy {acc_speaker:.3f} on unseen words")
    assert acc_voices >= 0.85, acc_voices
    assert acc_seeds >= 0.97, acc_seeds
    assert acc_speaker >= 0.9, acc_speaker


def test_word_codes_are_distinct():
    codes = list(WORD_CODES.values())
    assert len(set(codes)) == len(VOCAB) >= 100
    from simulate_data import _one_slip
    for i, c in enumerate(codes):   # no other word is within one phoneme slip
        near = _one_slip(c)
        assert not any(o in near for o in codes[:i] + codes[i + 1:])


def test_user_agent_edits_any_small_plan():
    """Every edit kind, drawn many times on the smallest plans (one sfx; one speaker; none left),
    terminates and names valid sources (a fixed first op once left `multi` redrawing forever, and
    an edit of an emptied plan picked a target from nothing)."""
    from simulate_data import UserAgent
    plans = [{"duration": 4.0, "sources": [{"id": 1, "type": "sfx", "sound": "bell", "start": 0.5, "dur": 1.5,
                                            "gain_db": 0, "pan": 0.0}]},
             {"duration": 4.0, "sources": [{"id": 1, "type": "speech", "voice": "ava", "text": "the dog",
                                            "start": 0.5, "dur": speech_duration("ava", "the dog"), "gain_db": 0, "pan": 0.0}]}]
    plans.append({"duration": 4.0, "sources": []})  # after removing everything
    user = UserAgent()
    for plan in plans:
        validate_plan(plan)
        for seed in range(150):
            rng = np.random.default_rng(seed)
            intent = user.edit_intent(plan, rng, EDIT_KINDS[seed % len(EDIT_KINDS)])
            ops = intent["ops"] if intent["edit"] == "multi" else [intent]
            assert all(op.get("target", 1) == 1 for op in ops), intent


def test_dialogue_structure():
    kinds = set()
    for seed in range(12):
        d, audios = make_dialogue(seed)
        json.dumps(d)
        turns = d["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert turns[0]["intent"]["kind"] == "story" and 3 <= len(turns) // 2 <= 4
        for u, a in zip(turns[:-2:2], turns[1:-2:2]):
            assert a["tools"][-1] == {"name": "render", "args": {}}
            validate_plan(a["plan"])
            p = a["plan"]
            assert 4.0 <= p["duration"] <= 6.0 and audios[a["audio"]].shape == (2, round(p["duration"] * SR))
            speakers = {s["voice"] for s in p["sources"] if s["type"] == "speech"}
            assert len(speakers) <= 2
            if u["intent"]["kind"] == "edit":
                assert u["intent"]["edit"] in EDIT_KINDS
                kinds.add(u["intent"]["edit"])
        story = turns[1]["plan"]
        assert 2 <= len(story["sources"]) <= 5
        assert len({s["voice"] for s in story["sources"] if s["type"] == "speech"}) <= 2
        # replaying the tool calls reproduces every plan
        st = Studio(seed=d["seed"])
        for a in turns[1:-2:2]:
            for c in a["tools"][:-1]:
                assert st.call(c["name"], c["args"]) == c.get("result")
            assert st.plan == a["plan"]
        u, a = turns[-2:]
        assert u["intent"]["kind"] == "understand" and u["audio"] == len(audios) - 1
        assert a["plan"] != story
        lines = a["text"].split("\n")
        if u["intent"]["task"] == "transcribe":
            assert a["text"] == transcript(a["plan"])
            want = sorted((s for s in a["plan"]["sources"] if s["type"] == "speech"), key=lambda s: s["start"])
            assert len(lines) == len(want)
            for line, s in zip(lines, want):
                assert line == f"{s['start']:.1f}-{s['start'] + s['dur']:.1f} {s['voice']}: {s['text']}"
        else:
            assert a["text"] == caption(a["plan"]) and len(lines) == len(a["plan"]["sources"])
            starts = [float(l.split("-")[0]) for l in lines]
            assert starts == sorted(starts)
        texts = dialogue_text(d)
        assert len(texts) == len(turns) and texts[1] == plan_to_text(turns[1]["plan"])
    assert len(kinds) >= 4, kinds


def test_listening_dialogue_structure():
    """Understanding turns only: 2-6 fresh scenes, each answered by its own transcript or caption."""
    import train
    lengths = set()
    for seed in range(6):
        d, audios = make_listening_dialogue(SPLIT_SEEDS["listen"] + seed)
        turns = d["turns"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * len(audios)
        assert LISTENING_TURNS[0] <= len(audios) <= LISTENING_TURNS[1]
        lengths.add(len(audios))
        for k, (u, a) in enumerate(zip(turns[::2], turns[1::2])):
            assert u["intent"]["kind"] == "understand" and u["audio"] == k
            validate_plan(a["plan"])
            assert audios[k].shape == (2, round(a["plan"]["duration"] * SR))
            assert a["text"] == (transcript if u["intent"]["task"] == "transcribe" else caption)(a["plan"])
        assert len({json.dumps(a["plan"]) for a in turns[1::2]}) == len(audios)   # distinct scenes
    assert len(lengths) > 1
    # every answer is learned in the joint stage, none in the text stage (the clips are cut there)
    tok = BPETokenizer()
    tok.train(dialogue_text(d), vocab_size=300)
    seq = encode_dialogue(d, [torch.zeros(a.shape[1] // 400 // 2 * 2, 64) for a in audios], tok)
    answers = sum(len(tok.encode_ordinary(a["text"])) + 1 for a in turns[1::2])
    assert int(seq["text_target"].sum()) == answers and not train.text_only(seq)["text_target"].any()


def test_dataset_on_disk():
    from simulate_data import write_dataset
    with tempfile.TemporaryDirectory() as out:
        write_dataset(out, n=4, n_eval=2, seed=0, workers=1, n_listen=2)
        assert sorted(os.listdir(out)) == ["listen_0000.pt", "meta.json", "test_0000.pt", "tokenizer.json",
                                           "train_0000.pt", "val_0000.pt"]
        meta = json.load(open(os.path.join(out, "meta.json")))
        assert meta["counts"] == {"train": 4, "listen": 2, "val": 2, "test": 2} and meta["sr"] == SR
        listen = torch.load(os.path.join(out, "listen_0000.pt"), weights_only=True)
        assert json.loads(listen["dialogues"][1]) == make_listening_dialogue(SPLIT_SEEDS["listen"] + 1)[0]
        ranges = sorted(meta["seeds"].values())
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))     # disjoint seed ranges
        codec = AudioCodec.from_state_dict(meta["codec"])
        shard = torch.load(os.path.join(out, "train_0000.pt"), weights_only=True)
        assert len(shard["dialogues"]) == len(shard["audio"]) == 4
        d = json.loads(shard["dialogues"][0])
        _, audios = make_dialogue(d["seed"])
        for lat, wav in zip(shard["audio"][0], audios):
            assert lat.dtype == torch.float16 and lat.shape == (wav.shape[1] // 400, 64)
            assert torch.allclose(lat.float(), codec.encode_raw(wav), atol=0.02)
        tok = BPETokenizer.load(os.path.join(out, "tokenizer.json"))
        text = dialogue_text(d)[1]
        assert tok.decode(tok.encode(text)) == text


# -----------------------------------------------------------------------------
# the tokenizers and the chat template (tokenizer.py)

PLAN = {"duration": 5.0, "sources": [
    {"id": 1, "type": "speech", "voice": "ava", "text": "the old dog runs home", "start": 0.4, "dur": 1.7, "gain_db": 0, "pan": -0.4},
    {"id": 2, "type": "sfx", "sound": "dog_bark", "start": 2.2, "dur": 0.5, "gain_db": -4, "pan": 0.6},
    {"id": 3, "type": "ambience", "sound": "rain", "start": 0.0, "dur": 5.0, "gain_db": -20, "pan": 0.0}]}


def _dialogue_texts(n=200, seed=0):
    """Dialogue-like training text: requests, JSON plans, timed transcripts."""
    rng = np.random.default_rng(seed)
    words = "the old dog runs home a cat sleeps by door rain falls on roof bird sings at dawn".split()
    texts = []
    for _ in range(n):
        plan = dict(PLAN, duration=float(rng.integers(40, 61)) / 10)
        plan["sources"] = [dict(s, start=round(float(rng.random() * 3), 1), gain_db=int(rng.integers(-30, 1)),
                                text=" ".join(rng.choice(words, 5))) if s["type"] == "speech" else s
                           for s in plan["sources"]]
        texts += ["Tell a story: ava says \"" + " ".join(rng.choice(words, 4)) + "\" in the rain.",
                  json.dumps(plan), f"{plan['sources'][0]['start']:.1f}-2.1 ava: the old dog runs home\n0.0-5.0 rain"]
    return texts


def _trained_tok():
    tok = BPETokenizer()
    tok.train(_dialogue_texts(), vocab_size=400)
    return tok


def test_bpe_known_merges():
    # minbpe's Wikipedia example: "aaabdaaabac" -> aa=Z, Za=Y, Yb=X -> "XdXac"
    tok = BPETokenizer()
    tok.train(["aaabdaaabac"], vocab_size=256 + 3 + len(SPECIAL_TOKENS))
    assert list(tok.merges.items()) == [((97, 97), 256), ((256, 97), 257), ((257, 98), 258)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tok.decode([258, 100, 258, 97, 99]) == "aaabdaaabac"
    assert tok.vocab_size == 259 + len(SPECIAL_TOKENS)
    assert [tok.special(s) for s in SPECIAL_TOKENS] == list(range(259, 259 + len(SPECIAL_TOKENS)))
    assert tok.encode("aaab aaab") == [258, 32, 258]  # two regex chunks, "aaab" and " aaab"


def test_bpe_roundtrip_specials_unicode():
    tok = _trained_tok()
    assert tok.vocab_size == 400
    cases = ["", " ", "\n\n  x \t", "the old dog runs home", '{"start": 0.4, "gain_db": -12, "pan": -0.4}',
             "héllo wörld ☔ 雨 🐕 -0.5e3 don't it's", "<|user|>Tell a story<|end|><|assistant|>{}<|audio|><|/audio|><|end|>",
             "<|us<|user|>er|> <|nope|> <|pad|><|null|>"]
    for text in cases:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, text
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode("<|user|>hi<|end|>") == [tok.special("<|user|>")] + tok.encode("hi") + [tok.special("<|end|>")]
    # encode_ordinary treats special strings as text: no forged roles
    plain = tok.encode_ordinary("<|audio|>")
    assert len(plain) > 1 and not set(plain) & set(tok.special_ids.values()) and tok.decode(plain) == "<|audio|>"
    # merges learned: the JSON plan compresses well below 1 token per byte
    plan = json.dumps(PLAN)
    assert len(tok.encode(plan)) < 0.45 * len(plan.encode())
    try:
        tok.special("<|foo|>")
        assert False
    except KeyError as e:
        assert "<|foo|>" in str(e)


def test_bpe_save_load():
    tok = _trained_tok()
    path = os.path.join(tempfile.mkdtemp(), "tok.json")
    tok.save(path)
    tok2 = BPETokenizer.load(path)
    json.dumps(tok.state_dict())  # JSON-serialisable
    assert tok2.vocab_size == tok.vocab_size and tok2.merges == tok.merges
    for text in _dialogue_texts(5, seed=1) + ["<|user|>ünïcode<|end|>"]:
        assert tok2.encode(text) == tok.encode(text)
    bad = dict(tok.state_dict(), special_tokens=SPECIAL_TOKENS[:-1])
    try:
        BPETokenizer.from_state_dict(bad)
        assert False
    except ValueError as e:
        assert "special tokens" in str(e)


def _scene(seconds=2.0, gains=((0.9, 0.3), (0.3, 0.9))):
    """Stereo scene: a harmonic tone with vibrato (panned by gains[0]) and a noise burst (gains[1])."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(220 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / SR
    tone = 0.2 * sum(np.sin(k * phase) / k for k in range(1, 8)) * (t < 1.2)
    burst = 0.1 * rng.standard_normal(t.size) * ((t > 0.8) & (t < 1.6))
    bed = 0.003 * rng.standard_normal((2, t.size))  # a faint ambience bed, as in every story
    return np.stack([gains[0][c] * tone + gains[1][c] * burst for c in range(2)]).astype(np.float32) + bed.astype(np.float32)


def test_codec_shapes_patchify_normalize():
    assert (SR, FRAME_RATE, HOP, N_MELS, PATCH, LATENT_DIM) == (16000, 40, 400, 32, 2, 128)
    codec = AudioCodec()
    x = _scene(1.0)
    raw = codec.encode_raw(x)
    assert raw.shape == (40, 64) and raw.dtype == torch.float32
    assert codec.encode_raw(x[:, :-1]).shape == (39, 64)  # T = N // HOP
    assert torch.equal(codec.encode_raw(torch.from_numpy(x)), raw)
    batch = codec.encode_raw(np.stack([x, x[::-1]]))
    assert batch.shape == (2, 40, 64) and torch.allclose(batch[0], raw) and torch.allclose(batch[1], raw.roll(32, -1))
    z = torch.randn(40, 64)
    p = AudioCodec.patchify(z)
    assert p.shape == (20, 128) and torch.equal(p[3], torch.cat([z[6], z[7]]))
    assert torch.equal(AudioCodec.unpatchify(p), z)
    assert AudioCodec.patchify(torch.randn(3, 40, 64)).shape == (3, 20, 128)
    assert torch.equal(AudioCodec.unpatchify(AudioCodec.patchify(z[None]))[0], z)
    codec.fit([raw, codec.encode_raw(_scene(1.0, gains=((0.5, 0.5), (0.1, 1.0))))])
    assert torch.allclose(codec.denormalize(codec.normalize(raw)), raw, atol=1e-5)
    zz = codec.encode(x)
    assert torch.allclose(zz, codec.normalize(raw))
    codec2 = AudioCodec.from_state_dict(json.loads(json.dumps(codec.state_dict())))
    assert torch.equal(codec2.encode(x), zz)
    try:
        AudioCodec().normalize(raw)
        assert False
    except RuntimeError as e:
        assert "fit()" in str(e)
    try:
        codec.encode_raw(x[:1])
        assert False
    except ValueError as e:
        assert "(2, N)" in str(e)


def test_codec_roundtrip_quality():
    codec = AudioCodec()
    x = _scene(2.0)
    raw = codec.encode_raw(x)
    y = codec.decode_raw(raw)
    assert y.shape == (2, 80 * HOP) and y.dtype == torch.float32 and y.abs().max() < 1.5
    assert torch.equal(codec.decode_raw(raw), y)  # deterministic (fixed initial phase)
    err = (codec.encode_raw(y) - raw).abs()
    assert err.mean() < 0.3, err.mean()  # measured 0.23 nat = 1.0 dB mean log-mel distance
    # stereo panning survives: the L/R energy ratio of each source's segment (tone: L 3x R, burst: R 3x L)
    for seg, want in ((slice(0, 12000), 9.0), (slice(20000, 25000), 1 / 9)):
        ratio = (y[0, seg] ** 2).sum() / (y[1, seg] ** 2).sum()
        assert abs(np.log(ratio.item() / want)) < np.log(1.25), (ratio, want)  # within 1 dB (measured 0.03 dB)
    # normalised latents: encode(decode(z)) is close to z (in units of the per-dim std)
    codec.fit([raw, codec.encode_raw(_scene(2.0, gains=((0.5, 0.5), (0.1, 1.0))))])
    z = codec.encode(x)
    dz = (codec.encode(codec.decode(z)) - z).abs().mean()
    assert dz < 0.15, dz  # measured 0.10


class _PlanStub(types.ModuleType):
    """Stand-in for simulate_data during this test: encode_dialogue needs only plan_to_text."""
    @staticmethod
    def plan_to_text(plan):
        return json.dumps(plan)


def test_encode_dialogue_layout():
    tok = _trained_tok()
    lat = [torch.randn(8, 64), torch.randn(12, 64), torch.randn(4, 64)]  # 4, 6, 2 patches
    dialogue = {"seed": 1, "turns": [
        {"role": "user", "text": "Tell a story.", "intent": {"kind": "story"}},
        {"role": "assistant", "tools": [], "plan": PLAN, "audio": 0},
        {"role": "user", "text": "Louder.", "intent": {"kind": "edit"}},
        {"role": "assistant", "tools": [], "plan": PLAN, "audio": 1},
        {"role": "user", "text": "Who says what?", "audio": 2, "intent": {"kind": "understand"}},
        {"role": "assistant", "text": "0.4-2.1 ava: the old dog runs home", "plan": {"ignored": True}}]}
    saved = sys.modules.get("simulate_data")
    sys.modules["simulate_data"] = _PlanStub("simulate_data")
    try:
        seq = encode_dialogue(dialogue, lat, tok)
        try:
            encode_dialogue({"turns": [{"role": "user", "text": "hi", "audio": 5}]}, lat, tok)
            assert False
        except IndexError as e:
            assert "audio 5" in str(e)
    finally:
        if saved is None:
            del sys.modules["simulate_data"]
        else:
            sys.modules["simulate_data"] = saved
    S = {s: tok.special(s) for s in SPECIAL_TOKENS}
    P = S["<|pad|>"]
    # the whole sequence, written out by hand from the template
    expect = ([S["<|user|>"]] + tok.encode("Tell a story.") + [S["<|end|>"], S["<|assistant|>"]] + tok.encode(json.dumps(PLAN))
              + [S["<|audio|>"]] + [P] * 4 + [S["<|/audio|>"], S["<|end|>"]]
              + [S["<|user|>"]] + tok.encode("Louder.") + [S["<|end|>"], S["<|assistant|>"]] + tok.encode(json.dumps(PLAN))
              + [S["<|audio|>"]] + [P] * 6 + [S["<|/audio|>"], S["<|end|>"]]
              + [S["<|user|>"]] + tok.encode("Who says what?") + [S["<|audio|>"]] + [P] * 2 + [S["<|/audio|>"], S["<|end|>"]]
              + [S["<|assistant|>"]] + tok.encode("0.4-2.1 ava: the old dog runs home") + [S["<|end|>"]])
    L = len(expect)
    assert seq["tokens"].tolist() == expect
    assert seq["audio"].shape == (L, 128) and seq["span_id"].shape == seq["text_target"].shape == seq["is_plain_text"].shape == (L,)
    assert seq["tokens"].dtype == seq["span_id"].dtype == torch.long
    assert "ignored" not in tok.decode(expect)  # an understanding turn's plan is evaluation-only
    # spans: ids 0, 1, 2 on exactly the <|pad|> positions, holding the patchified latents in order
    span = seq["span_id"]
    assert ((span >= 0) == (seq["tokens"] == P)).all()
    assert [int((span == s).sum()) for s in range(3)] == [4, 6, 2] and span.max() == 2
    for s in range(3):
        assert torch.equal(seq["audio"][span == s], AudioCodec.patchify(lat[s]))
        pos = (span == s).nonzero().flatten()
        assert (pos.diff() == 1).all() and expect[pos[0] - 1] == S["<|audio|>"] and expect[pos[-1] + 1] == S["<|/audio|>"]
    assert (seq["audio"][span < 0] == 0).all()
    assert seq["span_is_target"].tolist() == [True, True, False]
    # text targets: position i is a target iff tokens[i+1] is an assistant word, the assistant's <|audio|> or its <|end|>
    a1 = expect.index(S["<|assistant|>"])
    plan_len = len(tok.encode(json.dumps(PLAN)))
    tt = seq["text_target"].tolist()
    assert tt[a1:a1 + plan_len + 1] == [True] * (plan_len + 1)  # predicts every plan token, then <|audio|>
    assert not any(tt[:a1])                                      # nothing in the user's turn is learned
    assert tt[a1 + plan_len + 1: a1 + plan_len + 6] == [False] * 5  # <|audio|> and 4 pads -> pads / <|/audio|>: no CE
    assert tt[a1 + plan_len + 6] is True                          # <|/audio|> -> <|end|>: learned
    assert tt[a1 + plan_len + 7] is False                         # <|end|> -> <|user|>: not learned
    understand = len(expect) - len(tok.encode("0.4-2.1 ava: the old dog runs home")) - 2  # position of the last <|assistant|>
    assert expect[understand] == S["<|assistant|>"] and all(tt[understand:-1]) and not tt[-1]
    user_audio_open = [i for i, t in enumerate(expect) if t == S["<|audio|>"]][2]
    assert tt[user_audio_open - 1] is False                       # a user's <|audio|> is not learned
    assert sum(tt) == 2 * (plan_len + 2) + len(tok.encode("0.4-2.1 ava: the old dog runs home")) + 1
    # plain text: exactly the user and assistant words (specials and audio excluded)
    words = sum(len(tok.encode(t)) for t in ["Tell a story.", "Louder.", "Who says what?", "0.4-2.1 ava: the old dog runs home"]) + 2 * plan_len
    assert int(seq["is_plain_text"].sum()) == words
    assert not seq["is_plain_text"][torch.isin(seq["tokens"], torch.tensor(list(S.values())))].any()


# -----------------------------------------------------------------------------
# the model, the loss and the samplers (model.py, diffusion.py)

def tiny_model(arch="sct", attn="sdpa", seed=0, positions="rope"):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, latent_dim=8, n_layer=2, n_gen_layer=1, n_head=2, n_embd=32,
                         block_size=128, arch=arch, attn=attn, positions=positions)
    model = AudioChatModel(config)
    # the diffusion head and the token shift start at zero; give them weights so that tests see
    # audio outputs move and caches must carry the previous token across chunks
    torch.nn.init.normal_(model.diffusion_head.out.weight, std=0.1)
    torch.nn.init.normal_(model.shift.weight, std=0.3)
    return model


def random_sequence(layout, latent=8, seed=0):
    """layout: list of ("text", n) / ("audio", n) pieces -> tokens (L,), audio (L, latent), span_id (L,)."""
    g = torch.Generator().manual_seed(seed)
    tokens, span_id, n_spans = [], [], 0
    for kind, n in layout:
        tokens += torch.randint(0, 40, (n,), generator=g).tolist()
        span_id += [-1] * n if kind == "text" else [n_spans] * n
        n_spans += kind == "audio"
    L = len(tokens)
    return torch.tensor(tokens), torch.randn(L, latent, generator=g), torch.tensor(span_id)


def random_batch():
    """Two rows, same length, audio spans at different places per row, random per-token t."""
    rows = [random_sequence([("text", 5), ("audio", 6), ("text", 4), ("audio", 5), ("text", 4)], seed=1),
            random_sequence([("text", 9), ("audio", 4), ("text", 2), ("audio", 7), ("text", 2)], seed=2)]
    tokens, audio, span_id = (torch.stack(z) for z in zip(*rows))
    t = torch.where(span_id >= 0, torch.rand(span_id.shape, generator=torch.Generator().manual_seed(3)), 0.0)
    return tokens, audio, t, span_id


# -----------------------------------------------------------------------------
# the model

def test_model_mask_rule_by_hand():
    span_id = torch.tensor([[-1, 0, 0, -1, 1, 1]])
    m = transfusion_mask(span_id)[0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],   # an audio token sees its whole span...
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],   # ...text after it sees it causally
                             [1, 1, 1, 1, 1, 1],   # a later span sees earlier ones causally
                             [1, 1, 1, 1, 1, 1]])
    assert torch.equal(m, expected), m
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]])
    m = transfusion_mask(span_id, doc)[0]
    assert not m[3:, :3].any() and m[4, 5] and m[3, 3]  # nothing crosses documents


def test_model_attention_backends_agree():
    tokens, audio, t, span_id = random_batch()
    doc_id = torch.tensor([[0] * 12 + [1] * 12, [0] * 20 + [-1] * 4])   # two documents; one, then padding
    real = (doc_id >= 0)[..., None]   # padding's outputs are read by nothing, and backends may differ there
    models = {b: tiny_model(attn=b) for b in ("math", "sdpa", "flex")}  # same seed: same weights
    outs, grads = {}, {}
    for b, model in models.items():
        for doc in (None, doc_id):
            x = audio.clone().requires_grad_(b != "flex")
            # PyTorch has no FlexAttention backward on CPU: flex runs forward only (and unfused) here
            with torch.set_grad_enabled(b != "flex"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                logits, v = model(tokens, x, t, span_id, doc)
            logits, v = logits * real, v * real
            outs[b, doc is None] = (logits.detach(), v.detach())
            if b != "flex":
                (logits.square().mean() + v.square().mean()).backward()
                grads[b, doc is None] = [x.grad] + [p.grad.clone() for p in model.parameters()]
                model.zero_grad()
    diffs = []
    for b in ("sdpa", "flex"):
        for nodoc in (True, False):
            for ref, other in zip(outs["math", nodoc], outs[b, nodoc]):
                diffs.append((ref - other).abs().max().item())
                assert torch.allclose(ref, other, atol=1e-5), (b, diffs[-1])
    for nodoc in (True, False):
        for g_math, g_sdpa in zip(grads["math", nodoc], grads["sdpa", nodoc]):
            assert torch.allclose(g_math, g_sdpa, atol=1e-6), (g_math - g_sdpa).abs().max()
    print(f"  backends: max |forward diff| vs math {max(diffs):.1e}")


def test_model_flex_backward_on_cuda():
    """flex forward and backward against math on CUDA (skipped on a CPU-only machine)."""
    if not torch.cuda.is_available():
        print("  skipped: no CUDA (FlexAttention has no CPU backward)")
        return
    tokens, audio, t, span_id = (z.cuda() for z in random_batch())
    grads = {}
    for b in ("math", "flex"):
        model = tiny_model(attn=b).cuda()
        x = audio.clone().requires_grad_(True)
        logits, v = model(tokens, x, t, span_id)
        (logits.square().mean() + v.square().mean()).backward()
        grads[b] = [logits, v, x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(grads["math"], grads["flex"]):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_model_mask_causality_and_span_bidirectional():
    model = tiny_model()
    tokens, audio, t, span_id = random_batch()
    logits, v = model(tokens, audio, t, span_id)
    # row 0: text 0-4, span 0 at 5-10, text 11-14, span 1 at 15-19, text 20-23
    tok2, aud2 = tokens.clone(), audio.clone()
    tok2[0, 13] = (tok2[0, 13] + 1) % 40       # a future text token
    aud2[0, 17] += 1.0                         # a later span
    logits2, v2 = model(tok2, aud2, t, span_id)
    assert torch.allclose(logits[0, :13], logits2[0, :13], atol=1e-6)
    assert torch.allclose(v[0, :13], v2[0, :13], atol=1e-6)
    assert not torch.allclose(logits[0, 17:], logits2[0, 17:], atol=1e-4)
    aud3 = audio.clone()
    aud3[0, 9] += 1.0                          # a later token of span 0 ...
    logits3, v3 = model(tokens, aud3, t, span_id)
    assert not torch.allclose(v[0, 5], v3[0, 5], atol=1e-4)  # ... reaches an earlier token of it
    assert torch.allclose(logits[0, :5], logits3[0, :5], atol=1e-6)  # but not the text before the span
    assert torch.equal(logits[1], logits3[1]) and torch.equal(v[1], v3[1])  # nor the other row


def test_model_sct_text_ignores_generation_layers():
    tokens, audio, t, span_id = random_batch()
    for arch in ("sct", "dense"):
        model = tiny_model(arch=arch)
        logits, v = model(tokens, audio, t, span_id)
        with torch.no_grad():
            for p in model.blocks[model.config.n_layer:].parameters():
                p.add_(0.5 * torch.randn_like(p))
        logits2, v2 = model(tokens, audio, t, span_id)
        assert not torch.allclose(v, v2, atol=1e-4)
        assert torch.allclose(logits, logits2, atol=1e-6) == (arch == "sct"), arch
        text_logits, none = model(tokens, audio, t, span_id, layers="text")  # the text stage's path
        assert none is None and torch.allclose(text_logits, logits2, atol=1e-6), arch


def test_rope_attention_sees_relative_positions():
    """Rotary positions: a query at m and a key at n score the same as at m + c and n + c; and a
    model with rope gives a packed dialogue the outputs it gives that dialogue alone."""
    from model import rotary, rotate
    q, k = torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16)
    scores = [(rotate(q, rotary(torch.tensor([m]), 16)) * rotate(k, rotary(torch.tensor([n]), 16))).sum(-1)
              for m, n in ((7, 3), (107, 103), (3, 7))]
    assert torch.allclose(scores[0], scores[1], atol=1e-4) and not torch.allclose(scores[0], scores[2], atol=1e-3)
    model = tiny_model(positions="rope")
    tokens, audio, t, span_id = random_batch()
    alone = model(tokens[:1, 14:], audio[:1, 14:], t[:1, 14:], span_id[:1, 14:])
    packed = model(tokens[:1], audio[:1], t[:1], span_id[:1], doc_id=torch.tensor([[1] * 14 + [0] * 10]))
    assert torch.allclose(alone[0], packed[0][:, 14:], atol=1e-5) and torch.allclose(alone[1], packed[1][:, 14:], atol=1e-5)


def test_model_audio_embedding_norm_matches_text():
    model = tiny_model()
    tokens, audio, t, span_id = random_batch()
    model.shift = None   # the embeddings alone, without the token shift's mix of the previous one
    x = model.embed(tokens, 10 * audio, t, span_id, torch.arange(tokens.size(1)))[0]   # rope: no position added
    x = x - model.noise_emb(t) - model.span_time_emb(span_positions(span_id) / model.config.block_size)   # the conditions
    text_norm = model.wte.weight.norm(dim=1).mean()
    audio_norms = x[span_id >= 0].norm(dim=-1)
    assert torch.allclose(audio_norms, text_norm.expand_as(audio_norms), rtol=1e-5)


def test_model_span_positions_count_from_each_span_start():
    span_id = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, 2],
                            [3, 3, -1, 4, 4, 4, 4, -1, -1, -1]])   # a span may open the chunk
    assert span_positions(span_id).tolist() == [[0, 0, 1, 2, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 2, 3, 0, 0, 0]]


def test_noise_shift_divides_the_signal_to_noise_ratio():
    t = torch.linspace(0.05, 0.95, 19)
    for shift in (1.0, 3.0):
        (a, s), (a2, s2) = alpha_sigma(t), alpha_sigma(shift_noise_level(t, shift))
        assert torch.allclose(a2 / s2, a / s / shift, rtol=1e-4)   # alpha / sigma scaled by 1 / shift
    assert shift_noise_level(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]   # the ends stay put


# -----------------------------------------------------------------------------
# the loss

def test_noise_levels_one_per_span_and_clean_context():
    B, n_spans, n = 200, 4, 5
    span_id = torch.arange(n_spans).repeat_interleave(n).repeat(B, 1)
    span_id = torch.cat([torch.full((B, 3), -1), span_id], 1)           # some text first
    is_target = torch.tensor([True, False, True, True]).repeat(B, 1)    # span 1 supplied by the user
    t = sample_noise_levels(span_id, is_target, generator=torch.Generator().manual_seed(0))
    assert (t[:, :3] == 0).all()                                        # text is clean
    per_span = t[:, 3:].view(B, n_spans, n)
    assert (per_span == per_span[..., :1]).all()                        # one t per span ...
    targets = per_span[:, [0, 2, 3], 0]
    assert (targets[:, 0] != targets[:, 1]).all() and (targets[:, 1] != targets[:, 2]).all()  # ... each its own
    assert abs(targets.mean().item() - 0.5) < 0.05                      # t ~ U(0, 1)
    user = per_span[:, 1, 0]
    assert 0.8 < (user == 0).float().mean().item() < 0.97 and user.max() <= 0.1  # mostly clean, else small
    shifted = sample_noise_levels(span_id, is_target, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted[:, 3:].view(B, n_spans, n)[:, [0, 2, 3]], shift_noise_level(per_span[:, [0, 2, 3]], 3.0))
    assert (shifted[:, 3:].view(B, n_spans, n)[:, 1] == user[:, None]).all()   # the user's audio is not shifted
    assert abs(shifted[:, 3:].view(B, n_spans, n)[:, [0, 2, 3], 0].median().item() - 0.795) < 0.05  # (2/pi) atan(3)
    t = sample_noise_levels(span_id, is_target, per_frame=True, generator=torch.Generator().manual_seed(0))
    per_frame = t[:, 3:].view(B, n_spans, n)[:, 0]
    assert (per_frame[:, 1:] != per_frame[:, :1]).all()                 # per-frame: every token its own t


def fake_dialogue(layout, is_target, seed):
    """A dict shaped like tokenizer.encode_dialogue's output (L tokens, 8-float latents)."""
    tokens, audio, span_id = random_sequence(layout, seed=seed)
    audio = torch.where((span_id >= 0)[:, None], audio, 0.0)
    text_target = torch.zeros(len(tokens), dtype=torch.bool)
    text_target[-6:-1] = True                                           # the last few words are "assistant"
    return {"tokens": tokens, "audio": audio, "span_id": span_id, "span_is_target": torch.tensor(is_target),
            "text_target": text_target, "is_plain_text": span_id < 0}


def test_collate_pads_and_packs():
    a = fake_dialogue([("text", 4), ("audio", 3), ("text", 8)], [True], seed=1)          # 15 tokens
    b = fake_dialogue([("text", 3), ("audio", 2), ("text", 2), ("audio", 2), ("text", 7)], [False, True], seed=2)  # 16
    batch = collate([[a], [b]], pad_id=39)
    assert batch["tokens"].shape == (2, 16) and batch["span_is_target"].shape == (2, 2)
    assert batch["is_pad"][0, 15] and batch["tokens"][0, 15] == 39 and batch["span_id"][0, 15] == -1
    assert not batch["span_is_target"][0, 1]                            # padded with False
    packed = collate([[a, b]], pad_id=39)
    assert packed["tokens"].shape == (1, 31) and not packed["is_pad"].any()
    assert torch.equal(packed["doc_id"][0], torch.tensor([0] * 15 + [1] * 16))
    assert packed["span_id"][0, 15 + 3] == 1 and packed["span_id"][0, 15 + 7] == 2  # spans counted across the row
    assert packed["span_is_target"][0].tolist() == [True, False, True]


def test_loss_equals_ce_plus_5_mse_by_hand():
    model = tiny_model()
    batch = collate([[fake_dialogue([("text", 6), ("audio", 4), ("text", 9)], [True], seed=1)],
                     [fake_dialogue([("text", 4), ("audio", 3), ("text", 3), ("audio", 4), ("text", 7)], [False, True], seed=2)]],
                    pad_id=39)
    loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=0.0,
                                             generator=torch.Generator().manual_seed(7))
    # the same random draws, in the same order, then the loss written out token by token
    g = torch.Generator().manual_seed(7)
    t = sample_noise_levels(batch["span_id"], batch["span_is_target"], generator=g)
    eps = torch.randn(batch["audio"].shape, generator=g)
    alpha, sigma = alpha_sigma(t)[0][..., None], alpha_sigma(t)[1][..., None]
    x_t = alpha * batch["audio"] + sigma * eps
    logits, v = model(batch["tokens"], x_t, t, batch["span_id"], batch["doc_id"])
    ces, errs = [], []
    for b in range(2):
        for i in range(batch["tokens"].size(1)):
            if batch["text_target"][b, i]:
                ces.append(-torch.log_softmax(logits[b, i], -1)[batch["tokens"][b, i + 1]])
            s = batch["span_id"][b, i]
            if s >= 0 and batch["span_is_target"][b, s]:
                errs.append(((v[b, i] - (alpha[b, i] * eps[b, i] - sigma[b, i] * batch["audio"][b, i])) ** 2).mean())
    ce_hand, mse_hand = torch.stack(ces).mean(), torch.stack(errs).mean()
    assert len(errs) == 8 and len(ces) == 10
    assert torch.allclose(ce, ce_hand, atol=1e-5) and torch.allclose(mse, mse_hand, atol=1e-6)
    assert torch.allclose(loss, ce_hand + 5 * mse_hand, atol=1e-5)
    _, ce_dropped, _ = transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=1.0)
    assert ce_dropped == 0  # a sample whose text was dropped to <|null|> has no text loss
    # no target span (the text stage): loss = ce, and the generation layers are not even run
    text_batch = collate([[fake_dialogue([("text", 6), ("audio", 4), ("text", 9)], [False], seed=1)]], pad_id=39)
    loss, ce, mse = transfusion_forcing_loss(model, text_batch, null_id=38, cfg_drop_p=0.0)
    loss.backward()
    assert mse == 0 and loss == ce > 0
    assert all(p.grad is None for p in model.blocks[model.config.n_layer:].parameters())
    assert all(p.grad is not None for p in model.blocks[:model.config.n_layer].parameters())


# -----------------------------------------------------------------------------
# the samplers

def gaussian_v(mu, s):
    """The exact v-prediction for data x0 ~ N(mu, s^2) (per coordinate): x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2),
    E[eps | x_t] = sigma (x_t - alpha mu) / var, E[x0 | x_t] = mu + alpha s^2 (x_t - alpha mu) / var,
    v* = alpha E[eps | x_t] - sigma E[x0 | x_t]."""
    def v_fn(x, t):
        alpha, sigma = (a[:, None, None] for a in alpha_sigma(t))
        var = alpha ** 2 * s ** 2 + sigma ** 2
        e_eps = sigma * (x - alpha * mu) / var
        e_x0 = mu + alpha * s ** 2 * (x - alpha * mu) / var
        return alpha * e_eps - sigma * e_x0
    return v_fn


def test_samplers_reproduce_a_gaussian():
    mu, s = 1.5, 0.5
    noise = torch.randn(4, 1000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, x in [("ddim", ddim_sample(gaussian_v(mu, s), noise, steps=100)),
                    ("dpmpp", dpmpp_2m_sample(gaussian_v(mu, s), noise, steps=50))]:
        print(f"  {name}: mean {x.mean():.4f} (want {mu}), std {x.std():.4f} (want {s})")
        assert abs(x.mean() - mu) < 0.02 and abs(x.std() - s) < 0.02, name


def test_samplers_forward_formulas_and_cfg():
    x0, eps = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    t = torch.rand(2, 3)
    x_t, v = add_noise(x0, eps, t)
    alpha, sigma = (a[..., None] for a in alpha_sigma(t))
    assert torch.allclose(alpha * x_t - sigma * v, x0, atol=1e-6) and torch.allclose(sigma * x_t + alpha * v, eps, atol=1e-6)
    assert torch.equal(add_noise(x0, eps, torch.zeros(2, 3))[0], x0)  # t = 0 is clean
    v_c, v_u = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(cfg(v_c, v_u, 1.0), v_c, atol=1e-6) and torch.equal(cfg(v_c, v_u, 0.0), v_u)
    assert torch.allclose(cfg(v_c, v_u, 3.0), v_u + 3 * (v_c - v_u))


# -----------------------------------------------------------------------------
# the caches

def test_kv_cache_matches_full_forward():
    """Text token by token through the U layers only, audio spans as chunks through all layers
    (SCT's pending states catch up first): outputs equal one full forward."""
    layout = [("text", 5), ("audio", 4), ("text", 3), ("audio", 3), ("text", 3)]
    tokens, audio, span_id = (z[None] for z in random_sequence(layout, seed=4))
    t = torch.where(span_id >= 0, torch.rand(span_id.shape), 0.0)
    for arch, positions in (("sct", "rope"), ("dense", "rope"), ("sct", "learned")):
        model = tiny_model(arch=arch, positions=positions)
        logits, v = model(tokens, audio, t, span_id)
        cache, i = model.new_cache(1), 0
        for kind, n in layout:
            if kind == "text":
                for j in range(i, i + n):
                    lg, _ = model.extend(cache, tokens[:, j:j + 1], audio[:, j:j + 1], t[:, j:j + 1], span_id[:, j:j + 1], layers="text")
                    assert torch.allclose(lg, logits[:, j:j + 1], atol=1e-5), (arch, j)
            else:
                sl = slice(i, i + n)
                lg, vv = model.extend(cache, tokens[:, sl], audio[:, sl], t[:, sl], span_id[:, sl], layers="all")
                assert torch.allclose(lg, logits[:, sl], atol=1e-5) and torch.allclose(vv, v[:, sl], atol=1e-5), arch
            i += n
        assert len(cache) == tokens.size(1)


def test_prefix_cache_sample_audio_matches_recompute():
    """sample_audio (prefix computed once, batched CFG) equals sampling while recomputing the
    whole sequence at every step; afterwards the cache holds the clean span."""
    model = tiny_model()
    prefix, _, _ = random_sequence([("text", 7)], seed=5)
    cond = prefix[None]
    uncond = torch.where(torch.arange(7) > 0, 38, cond)  # plain text dropped to <|null|> = 38
    prompt = torch.cat([cond, uncond])
    n, scale = 5, 3.0
    cache = model.new_cache(2)
    for j in range(7):  # the prefix, decoded as text would be (U layers, pending G)
        model.extend(cache, prompt[:, j:j + 1], torch.zeros(2, 1, 8), torch.zeros(2, 1), torch.full((2, 1), -1), layers="text")
    x_cached = sample_audio(model, cache, n, steps=4, sampler="ddim", cfg_scale=scale,
                            generator=torch.Generator().manual_seed(0))

    span_id = torch.tensor([[-1] * 7 + [0] * n]).expand(2, -1)
    tokens = torch.cat([prompt, torch.zeros(2, n, dtype=torch.long)], 1)

    def v_full(x, t):
        audio = torch.cat([torch.zeros(2, 7, 8), torch.cat([x, x])], 1)
        tt = torch.cat([torch.zeros(2, 7), t.repeat(2)[:, None].expand(2, n)], 1)
        v = model(tokens, audio, tt, span_id)[1][:, 7:]
        return cfg(v[:1], v[1:], scale)
    noise = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_full = ddim_sample(v_full, noise, steps=4)
        assert torch.allclose(x_cached, x_full, atol=1e-5), (x_cached - x_full).abs().max()
        # the committed clean span: the next text token sees it exactly as a full forward does
        nxt = torch.tensor([[3], [3]])
        lg, _ = model.extend(cache, nxt, torch.zeros(2, 1, 8), torch.zeros(2, 1), torch.full((2, 1), -1), layers="text")
        audio = torch.cat([torch.zeros(2, 7, 8), torch.cat([x_full, x_full]), torch.zeros(2, 1, 8)], 1)
        full = model(torch.cat([tokens, nxt], 1), audio, torch.zeros(2, 13), torch.cat([span_id, torch.full((2, 1), -1)], 1))[0]
        assert torch.allclose(lg[:, 0], full[:, -1], atol=1e-5)
        # without guidance the cache holds only the conditional rows
        cache = model.new_cache(1)
        model.extend(cache, cond, torch.zeros(1, 7, 8), torch.zeros(1, 7), torch.full((1, 7), -1))
        x = sample_audio(model, cache, n, steps=3, sampler="dpmpp", cfg_scale=1.0)
        assert x.shape == (1, n, 8) and len(cache) == 7 + n


# -----------------------------------------------------------------------------
# training

def test_overfit_one_batch():
    model = tiny_model()
    batch = collate([[fake_dialogue([("text", 6), ("audio", 6), ("text", 9)], [True], seed=1)],
                     [fake_dialogue([("text", 4), ("audio", 5), ("text", 3), ("audio", 5), ("text", 7)], [False, True], seed=2)]],
                    pad_id=39)
    opt = model.configure_optimizers(weight_decay=0.0, learning_rate=5e-3, betas=(0.9, 0.95), device_type="cpu")
    g = torch.Generator().manual_seed(0)
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose time to thread hand-offs (x50 on a busy machine)
    try:
        for step in range(300):
            loss, ce, mse = transfusion_forcing_loss(model, batch, null_id=38, generator=g)
            first = first or (ce.item(), mse.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # average a few noise draws for a steady figure
        last = torch.tensor([transfusion_forcing_loss(model, batch, null_id=38, cfg_drop_p=0.0, generator=g)[1:]
                             for _ in range(20)]).mean(0).tolist()
    print(f"  overfit: ce {first[0]:.3f} -> {last[0]:.3f}, mse {first[1]:.3f} -> {last[1]:.3f}")
    assert last[0] < 0.01 * first[0] and last[1] < 0.4 * first[1]

# -----------------------------------------------------------------------------
# training (train.py) and chat (sample.py), on a tiny simulated dataset

TINY = ["--n_layer=2", "--n_gen_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=2", "--block_size=1024",
        "--eval_iters=1", "--warmup_iters=2", "--device=cpu", "--text_iters=2"]   # both curriculum stages


def tiny_dataset():
    """A dataset of 12 train / 4 val / 4 test dialogues, simulated once per test run."""
    path = os.path.join(TMP, "data")
    if not os.path.exists(os.path.join(path, "meta.json")):
        import simulate_data
        simulate_data.write_dataset(path, n=12, n_eval=4, workers=2, n_listen=3)
    return path


def run_train(*flags):
    import train
    config = train.parse_config(train.TrainConfig, [f"--data_dir={tiny_dataset()}", *TINY, *flags], train.PRESETS)
    return train.train(config)


def test_train_writes_checkpoint_log_and_plot():
    import contextlib
    import io
    out = os.path.join(TMP, "smoke")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = run_train(f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    said = printed.getvalue()   # a smaller dataset is said; the listening dialogues are trained on
    assert "holds 12 train dialogues, fewer than the 3000" in said and "holds 3 listen dialogues" in said
    assert "15 train dialogues packed" in said
    for name in ("ckpt.pt", "log.csv", "loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert [r["iter"] for r in rows][:4] == [0, 1, 2, 3] and rows[-1]["val_ce"] != ""
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["iter_num"] == 4 and {"model", "optimizer", "model_args", "config", "tokenizer", "codec"} <= set(ckpt)


def test_text_only_stage_cuts_the_audio_and_the_answer_about_it():
    import train
    d, audios = make_dialogue(5)
    tok = BPETokenizer()
    tok.train(dialogue_text(d), vocab_size=300)
    seq = encode_dialogue(d, [torch.zeros(a.shape[1] // 400 // 2 * 2, 64) for a in audios], tok)
    text = train.text_only(seq)
    assert (text["span_id"] == -1).all() and len(text["span_is_target"]) == 0
    assert len(text["tokens"]) == int((seq["span_id"] < 0).sum())
    assert (text["tokens"] == tok.special("<|audio|>")).sum() == len(audios)   # the markers stay
    # every plan token is still learned; the answer (after the user's clip) is not
    words = tok.decode([int(x) for x, learn in zip(text["tokens"][1:], text["text_target"][:-1]) if learn])
    plans = [plan_to_text(t["plan"]) for t in d["turns"] if t["role"] == "assistant" and "audio" in t]
    assert all(p in words for p in plans) and d["turns"][-1]["text"] not in words
    learned = int(seq["text_target"].sum()) - int(text["text_target"].sum())
    assert learned == len(tok.encode_ordinary(d["turns"][-1]["text"])) + 1   # the answer and its <|end|>


def test_train_resume_is_exact():
    """Train 6 steps straight, or 3 steps + resume for 3 more: the same losses, step for step."""
    straight = run_train(f"--out_dir={os.path.join(TMP, 'straight')}", "--max_iters=6", "--eval_interval=3",
                         "--lr_decay_iters=6")
    half = os.path.join(TMP, "halves")
    run_train(f"--out_dir={half}", "--max_iters=3", "--eval_interval=3", "--lr_decay_iters=6")
    resumed = run_train(f"--out_dir={half}", "--max_iters=6", "--eval_interval=3", "--lr_decay_iters=6",
                        "--init_from=resume")
    a = [float(r["loss"]) for r in straight if r["loss"] != ""]
    b = [float(r["loss"]) for r in resumed if r["loss"] != ""]
    assert len(a) == len(b) == 6
    assert np.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


def test_train_rejects_bad_flags():
    import subprocess
    for flags, words in [(["--nonsense=1"], "unknown argument"), (["--max_iters=ten"], "expects int"),
                         (["--init_from=resume", f"--out_dir={os.path.join(TMP, 'nothing')}",
                           f"--data_dir={tiny_dataset()}"], "no checkpoint"),
                         (["--n_listen=-1", f"--out_dir={os.path.join(TMP, 'nothing')}"], "--n_listen >= 0")]:
        r = subprocess.run([sys.executable, "train.py", *flags], cwd=HERE, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and words in r.stderr, (flags, r.stderr[-300:])
        assert "Traceback" not in r.stderr, r.stderr[-300:]


def test_ddp_two_processes_on_cpu():
    import subprocess
    out = os.path.join(TMP, "ddp")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
                        f"--data_dir={tiny_dataset()}", f"--out_dir={out}", *TINY, "--max_iters=2", "--eval_interval=2"],
                       cwd=HERE, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.exists(os.path.join(out, "ckpt.pt"))


def smoke_checkpoint():
    path = os.path.join(TMP, "smoke", "ckpt.pt")
    if not os.path.exists(path):
        run_train(f"--out_dir={os.path.dirname(path)}", "--max_iters=4", "--eval_interval=2")
    return path


def test_chat_cached_decoding_equals_full_recompute():
    """Greedy decoding through the KV cache (U layers, token by token) picks the same tokens as
    recomputing the whole sequence with forward() at every step."""
    from sample import Chat
    chat = Chat.from_checkpoint(smoke_checkpoint(), "cpu", cfg_scale=1.0, max_new_tokens=12)
    model, tok = chat.model, chat.tok
    prompt = [tok.special("<|user|>")] + tok.encode_ordinary("Tell a story: ava says \"the dog runs home\".") + \
             [tok.special("<|end|>"), tok.special("<|assistant|>")]
    logits = chat._feed(prompt, [False] * len(prompt))
    cached, _ = chat._decode(logits)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            L = len(ids)
            text_logits, _ = model(torch.tensor([ids]), torch.zeros(1, L, model.config.latent_dim), torch.zeros(1, L),
                                   torch.full((1, L), -1))
            nxt = int(text_logits[0, -1].argmax())
            if nxt in (tok.special("<|audio|>"), tok.special("<|end|>")):
                break
            ids.append(nxt)
    assert cached == tok.decode(ids[len(prompt):])


def test_chat_understands_44k_mono_wav_and_refuses_long_audio():
    import soundfile as sf
    from sample import Chat, load_audio
    t = np.arange(int(44100 * 1.25)) / 44100
    path = os.path.join(TMP, "mono44k.wav")
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100)
    wav = load_audio(path)
    assert wav.shape == (2, 20800) and np.allclose(wav[0], wav[1])  # 1.25 s -> 1.3 s of whole tenths
    # the tone is still at 440 Hz after resampling
    spectrum = np.abs(np.fft.rfft(wav[0, :16000]))
    assert abs(np.argmax(spectrum) - 440) <= 1
    chat = Chat.from_checkpoint(smoke_checkpoint(), "cpu", max_new_tokens=8)
    answer = chat.understand(path, "Who says what, and when?")
    assert isinstance(answer.text, str) and answer.error is None
    sf.write(path, np.zeros(16000 * 9, np.float32), 16000)
    try:
        load_audio(path)
        raise AssertionError("a 9 s clip should be refused")
    except ValueError as e:
        assert "at most" in str(e)


def test_corrupt_or_missing_checkpoint_is_one_clear_error():
    import subprocess
    bad = os.path.join(TMP, "corrupt.pt")
    with open(bad, "wb") as f:
        f.write(b"this is not a checkpoint")
    for path, words in [(bad, "not a readable AudioChat-mini checkpoint"), (os.path.join(TMP, "missing.pt"), "no checkpoint")]:
        r = subprocess.run([sys.executable, "sample.py", f"--ckpt={path}", "--prompt", "hello"], cwd=HERE,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-500:]


def test_checkpoint_from_before_rotary_positions_loads():
    """A checkpoint whose model_args predate --positions (learned positions) still loads."""
    from train import load_checkpoint
    ckpt = torch.load(smoke_checkpoint(), weights_only=True)
    args = {k: v for k, v in ckpt["model_args"].items() if k != "positions"}
    ckpt["model"] = AudioChatModel(ModelConfig(**args, positions="learned")).state_dict()
    ckpt["model_args"] = args
    old = os.path.join(TMP, "old_ckpt.pt")
    torch.save(ckpt, old)
    model = load_checkpoint(old)[0]
    assert model.config.positions == "learned" and model.wpe is not None


def test_chat_reports_an_invalid_plan_and_goes_on():
    from sample import Chat
    chat = Chat.from_checkpoint(smoke_checkpoint(), "cpu", max_new_tokens=6)  # 6 tokens: never a whole plan
    turn = chat.generate("Tell a story: ava says \"the dog runs home\".")
    assert turn.wav is None and turn.error.startswith("the model wrote"), turn
    again = chat.edit("Make it quieter.")
    assert again.error is not None and len(chat.turns) == 4


def test_chat_audio_turn_writes_wav_plan_and_picture():
    """The audio path of a turn, with the plan teacher-forced (a smoke model cannot write one yet):
    the span length follows the plan's duration, the audio decodes to that many samples, the
    edit sees it in the cache, and save_turn writes wav + plan + PNG."""
    from sample import Chat, save_turn
    chat = Chat.from_checkpoint(smoke_checkpoint(), "cpu", steps=3)
    plan = {"duration": 2.0, "sources": [{"id": 1, "type": "sfx", "sound": "bell", "start": 0.2, "dur": 1.5,
                                          "gain_db": 0, "pan": -0.5}]}
    plan_text = plan_to_text(plan)

    def forced_decode(logits):
        ids = chat.tok.encode_ordinary(plan_text)
        chat._feed(ids, [True] * len(ids))
        chat._feed([chat.ids["<|audio|>"]], [False])
        return plan_text, chat.ids["<|audio|>"]

    chat._decode = forced_decode
    before = len(chat.cache)
    turn = chat.generate("Ring a bell on the left.")
    assert turn.error is None and turn.plan == plan
    assert turn.wav.shape == (2, 2 * SR) and np.isfinite(turn.wav).all()
    n_tokens = 2 * FRAME_RATE // PATCH
    assert len(chat.cache) >= before + n_tokens + 2  # the span and its closing tokens are in the dialogue
    paths = save_turn(turn, os.path.join(TMP, "chat"), "turn_0")
    assert [os.path.splitext(p)[1] for p in paths] == [".json", ".wav", ".png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    edited = chat.edit("Make it louder.")
    assert edited.wav is not None and len(chat.turns) == 4


# -----------------------------------------------------------------------------
# evaluation (eval.py): the metrics' definitions, the judge, the benchmark end to end

def levenshtein(a, b):
    """Plain word edit distance, the textbook DP."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[len(b)]


def random_stream(rng, n, vocab="abcde"):
    words = [rng.choice(vocab) for _ in range(n)]
    out = []
    for w in words:
        s = rng.uniform(0, 10)
        out.append((w, s, s + rng.uniform(0, 2)))
    return out


# -----------------------------------------------------------------------------
# tcpWER

def test_tcpwer_equals_levenshtein_when_every_interval_overlaps():
    rng = random.Random(0)
    for _ in range(200):
        a = [(rng.choice("abcd"), 0.0, 1.0) for _ in range(rng.randint(0, 7))]
        b = [(rng.choice("abcd"), 0.0, 1.0) for _ in range(rng.randint(0, 7))]
        r = E.time_constrained_levenshtein(a, b)
        assert r["errors"] == levenshtein([w for w, *_ in a], [w for w, *_ in b])


def test_tcpwer_bounds_and_error_counts():
    rng = random.Random(1)
    for _ in range(300):
        a, b = random_stream(rng, rng.randint(0, 8)), random_stream(rng, rng.randint(0, 8))
        r = E.time_constrained_levenshtein(a, b)
        plain = levenshtein([w for w, *_ in a], [w for w, *_ in b])
        assert plain <= r["errors"] <= len(a) + len(b)
        assert r["ins"] + r["del"] + r["sub"] == r["errors"]
        assert r["ins"] - r["del"] == len(b) - len(a)   # every hypothesis word is matched, substituted or inserted


def test_tcpwer_word_outside_collar_is_deletion_plus_insertion():
    ref = [("ava", 0.0, 2.0, "the old dog")]
    near = [("ava", 0.0, 2.0, "the old cat")]
    far = [("ava", 0.0, 1.4, "the old"), ("ava", 30.0, 30.5, "cat")]   # "cat" 28 s late: outside the 5 s collar
    r = E.tcp_wer(ref, near, collar=5.0)
    assert (r["errors"], r["sub"], r["ins"], r["del"]) == (1, 1, 0, 0)
    r = E.tcp_wer(ref, far, collar=5.0)
    assert (r["errors"], r["sub"], r["ins"], r["del"]) == (2, 0, 1, 1)
    r = E.tcp_wer(ref, far, collar=40.0)       # a collar wide enough makes it a substitution again
    assert (r["errors"], r["sub"]) == (1, 1)


def test_tcpwer_speaker_permutation_invariance():
    ref = [("ava", 0.0, 1.5, "hello my friend"), ("ben", 1.0, 2.5, "the old dog runs home"),
           ("ava", 3.0, 4.0, "come here"), ("cleo", 4.0, 5.0, "go away")]
    hyp = [("ava", 0.1, 1.4, "hello my friend"), ("ben", 1.2, 2.5, "the dog runs home"),
           ("cleo", 3.0, 4.0, "come here now"), ("ava", 4.0, 5.0, "go away")]
    base = E.tcp_wer(ref, hyp)
    names = {"ava": "x", "ben": "y", "cleo": "z"}
    renamed = [(names[s], a, b, t) for s, a, b, t in reversed(hyp)]
    for perm in itertools.permutations(["p", "q", "r"]):
        relabel = dict(zip(["ava", "ben", "cleo"], perm))
        for h in (renamed, [(relabel[s], a, b, t) for s, a, b, t in hyp]):
            r = E.tcp_wer(ref, h)
            assert (r["errors"], r["ins"], r["del"], r["sub"]) == (base["errors"], base["ins"], base["del"], base["sub"])
    assert E.tcp_wer(ref, ref)["errors"] == 0 and base["errors"] > 0
    # speaker names need not agree: the assignment pairs them
    crossed = E.tcp_wer([("ava", 0.0, 1.0, "a b")], [("ben", 0.0, 1.0, "a b")])
    assert crossed["errors"] == 0 and crossed["assignment"] == {"ava": "ben"}


def test_transcript_parser_and_true_answer():
    eps = episodes()
    for ep in eps:
        text = transcript(ep.scene)
        assert E.tcp_wer(E.reference_segments(ep.scene), E.parse_transcript(text))["errors"] == 0
    text = "0.4-1.9 ava: the old dog runs\nnonsense line\n2.0-1.0 ben: backwards\n3.0-4.0 : nobody\n5.0-6.0 ben:"
    assert E.parse_transcript(text) == [("ava", 0.4, 1.9, "the old dog runs")]
    r = E.tcp_wer([("ava", 0.4, 1.9, "the old dog runs"), ("ben", 2.0, 3.0, "hello")], E.parse_transcript(text))
    assert (r["errors"], r["del"]) == (1, 1)   # the unparseable lines count as nothing: "hello" is missing


def test_listening_profile_scores_exactly_the_answer_and_sees_the_clip():
    eps, seqs, tok, codec = E.resimulated_test_dialogues(3)
    for ep, seq in zip(eps, seqs):   # the positions scored predict the answer's tokens, then <|end|>
        assert tok.decode(seq["tokens"][1:][E.answer_positions(seq)]) == ep.answer + "<|end|>"
    torch.manual_seed(0)
    model = AudioChatModel(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_gen_layer=1, n_head=2, n_embd=32)).eval()
    profile = E.listening_profile(model, tok, codec, n=3)
    assert sum(p["n"] for p in profile.values()) == 3 and set(profile) <= {"transcribe", "describe"}
    for p in profile.values():   # an untrained model is unsure either way, but the clip changes its logits
        assert 5 < p["ce_clip"] < 9 and p["ce_clip"] != p["ce_without_clip"]


# -----------------------------------------------------------------------------
# KAD

def test_kad_near_zero_for_one_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = torch.randn(300, 16, generator=g)
    same = E.kad(x, y)
    assert abs(same) < 0.5, same
    values = [E.kad(x, y + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > 20


def test_kad_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(4, 3, generator=g).double() + 0.5
    d = [float(torch.dist(a, b)) for a, b in itertools.combinations(x, 2)]
    bw = sorted(d)[(len(d) - 1) // 2]   # torch's median: the lower middle value
    k = lambda a, b: np.exp(-float(torch.dist(a, b)) ** 2 / (2 * bw ** 2))  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(a, b) for a in x for b in y) / 20
    assert abs(E.kad(x, y) - 100 * (xx + yy - 2 * xy)) < 1e-9


def test_kad_bandwidth_comes_from_the_reference_only():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 8, generator=g)
    bw = E.median_pairwise_distance(x)
    for scale in (0.1, 1.0, 10.0):   # evaluated sets of very different spreads
        y = scale * torch.randn(40, 8, generator=g)
        assert E.kad(x, y) == E.kad(x, y, bandwidth=bw)
        assert E.kad(x, y) != E.kad(x, y, bandwidth=E.median_pairwise_distance(y))


# -----------------------------------------------------------------------------
# captions, plans

def test_caption_multiflam_and_plan_metrics():
    from simulate_data import caption, plan_to_text
    for ep in episodes():
        plan = ep.story["plan"]
        assert E.caption_multiflam(caption(plan), plan) == 100.0
        lines = caption(plan).splitlines()
        assert E.caption_multiflam("\n".join(lines[1:]), plan) == 100.0 * (len(lines) - 1) / len(lines)
        shifted = "\n".join(f"{float(a.split('-')[0]) + 20:.1f}-{float(a.split('-')[1]) + 20:.1f} {n}"
                            for a, n in (line.split(" ", 1) for line in lines))
        assert E.caption_multiflam(shifted, plan) == 0.0   # the right names at the wrong times
        assert E.caption_multiflam("garbage\n\n-", plan) == 0.0
        assert E.plan_validity([plan_to_text(plan), "{not json", plan_to_text(plan)[:-5]]) == 100 / 3
        bark = {"id": 1, "type": "sfx", "sound": "dog_bark", "start": 3.9, "gain_db": -3, "pan": 0.0}
        line = {"id": 2, "type": "speech", "voice": "ava", "text": "come here", "start": 0.5, "gain_db": -3, "pan": 0.0}
        late, twice = ({"duration": 4.0, "sources": s} for s in ([bark], [line, {**line, "id": 3}]))
        assert [E.plan_failure(t) for t in (plan_to_text(plan), "{not json", json.dumps(late), json.dumps(twice))] == \
            [None, "not JSON", "past the story's end", "a voice talks over itself"]
        assert E.plan_failure(json.dumps({**late, "duration": 99.0})) == "other"   # outside the allowed durations
        assert E.plan_recall(plan, plan) == 100.0 and E.plan_recall(plan, None) == 0.0
        fewer = copy.deepcopy(plan)
        fewer["sources"].pop()
        assert E.plan_recall(plan, fewer) == 100.0 * (len(plan["sources"]) - 1) / len(plan["sources"])


def test_eval_flags():
    from train import parse_config
    c = parse_config(E.EvalConfig, ["--ckpt", "a.pt", "--ckpt=b.pt", "--n", "3", "--steps=10"])
    assert c.ckpt == ["a.pt", "b.pt"] and c.n == 3 and c.steps == 10 and c.data_dir == "data"
    try:
        parse_config(E.EvalConfig, ["--ckpt", "a.pt", "--bogus=1"])
        raise AssertionError("an unknown flag must be rejected")
    except SystemExit:
        pass
    assert E.system_names(["out/a/ckpt.pt", "out/dense/ckpt.pt", "out/sct2/ckpt.pt"], ["sct", "dense", "dense"]) == \
        ["audiochat", "audiochat_dense", "audiochat_sct2"]
    assert E.system_names(["out/ckpt.pt", "out/seed1/ckpt.pt"], ["sct", "sct"]) == ["audiochat", "audiochat_seed1"]


# -----------------------------------------------------------------------------
# the judge and the metrics built on it, on ground-truth audio

_CACHE = {}


TEST_JUDGE = os.path.join(TMP, "judge.pt")


def judge():
    """A smaller judge than eval.py's (120 stories, 500 steps: ~1 min on 2 cores, ~91% frame F1
    instead of ~95%), trained once per test run."""
    if "judge" not in _CACHE:
        _CACHE["judge"] = E.load_or_train_judge(TEST_JUDGE, verbose=False, n_stories=120, steps=500)
    return _CACHE["judge"]


def episodes():
    """A few StoryGen-Eval-toy-like dialogues (test-range seeds), re-read as eval.py reads them."""
    if "episodes" not in _CACHE:
        eps = [E.episode(make_dialogue(seed)[0]) for seed in range(20_000_000, 20_000_012)]
        _CACHE["episodes"] = eps
    return _CACHE["episodes"]


def edit_cases():
    """(episode, wav_before, wav_after, plan_before, plan_after, intent) for every edit turn."""
    if "edits" not in _CACHE:
        cases = []
        for ep in episodes():
            before = ep.story["plan"]
            for e in ep.edits:
                cases.append((ep, render(before, ep.seed), render(e["plan"], ep.seed), before, e["plan"], e["intent"]))
                before = e["plan"]
        _CACHE["edits"] = cases
    return _CACHE["edits"]


def test_judge_quality_and_ground_truth_multiflam():
    j = judge()
    assert j.info["frameF1"] >= 85, j.info
    eps = episodes()
    wavs = [render(ep.story["plan"], ep.seed) for ep in eps]
    scores = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs)]
    # the same plans heard in another story's audio: what a judge that ignores the audio would give
    mismatched = [E.multiflam(j, wav, ep.story["plan"]) for ep, wav in zip(eps, wavs[1:] + wavs[:1])]
    assert np.mean(scores) >= 70, scores  # eval.py's bigger judge gives ~92 (README)
    assert np.mean(scores) >= np.mean(mismatched) + 30, (scores, mismatched)
    assert E.multiflam(j, None, episodes()[0].story["plan"]) == 0.0   # no audio, nothing heard
    silent = np.zeros((2, 5 * 16000), np.float32)
    assert E.multiflam(j, silent, episodes()[0].story["plan"]) == 0.0


def test_editflam_ground_truth_high_and_wrong_edits_low():
    j = judge()
    right, copied = [], []
    for ep, wb, wa, pb, pa, intent in edit_cases():
        right.append(E.edit_flam(j, wb, wa, pb, pa, intent, pb, ep.seed))
        # the audio of the previous turn presented as the edit (the plan says it was done)
        copied.append(E.edit_flam(j, wb, wb, pb, pa, intent, pb, ep.seed))
    assert np.mean(right) >= 75, right
    assert np.mean(copied) <= 10, copied


def test_editflam_removal_that_did_not_happen():
    j = judge()
    for ep in episodes()[:6]:
        plan = ep.story["plan"]
        target = max(plan["sources"], key=lambda s: s["gain_db"])   # a loud, clearly audible source
        after = {"duration": plan["duration"], "sources": [s for s in plan["sources"] if s is not target]}
        intent = {"kind": "edit", "edit": "remove", "target": target["id"]}
        wav = render(plan, ep.seed)
        assert E.edit_flam(j, wav, render(after, ep.seed), plan, after, intent, plan, ep.seed) == 100.0
        assert E.edit_flam(j, wav, wav, plan, after, intent, plan, ep.seed) == 0.0     # the audio still has it
        assert E.edit_flam(j, wav, render(after, ep.seed), plan, plan, intent, plan, ep.seed) == 0.0  # the plan kept it
        assert E.edit_flam(j, wav, None, plan, after, intent, plan, ep.seed) == 0.0     # no audio: no edit


def test_untouched_sources_do_not_drift():
    j = judge()
    drifts = []
    for ep, wb, wa, pb, pa, intent in edit_cases():
        assert E.delta_multiflam(j, wb, wb, pb, pa) in (0.0, None)   # the same audio: no drift at all
        d = E.delta_multiflam(j, wb, wa, pb, pa)
        if d is not None:
            drifts.append(d)
        lost = E.delta_multiflam(j, wb, None, pb, pa)                 # an edit that lost the audio
        if d is not None:
            assert lost >= d
    assert np.mean(drifts) <= 10, drifts
    ep = episodes()[0]
    plan = ep.story["plan"]
    target = plan["sources"][0]
    louder = copy.deepcopy(plan)
    louder["sources"][0]["gain_db"] = min(6, target["gain_db"] + 6)
    kept = E.untouched(plan, louder)
    assert [s["id"] for s in kept] == [s["id"] for s in plan["sources"][1:]]


def test_evaluate_end_to_end_writes_the_paper_tables():
    """A tiny dataset, an untrained tiny checkpoint (its plans are garbage: every audio metric of
    the model must then be 0 or missing, never a crash), the cached judge: eval.json's shape."""
    import json
    import shutil
    import tempfile
    import simulate_data
    from model import AudioChatModel, ModelConfig
    from tokenizer import AudioCodec, BPETokenizer
    from train import TrainConfig, save_checkpoint
    tmp = tempfile.mkdtemp(prefix="eval_test_")
    simulate_data.write_dataset(os.path.join(tmp, "data"), 4, 2, workers=1)
    tok = BPETokenizer.load(os.path.join(tmp, "data", "tokenizer.json"))
    with open(os.path.join(tmp, "data", "meta.json")) as f:
        codec = AudioCodec.from_state_dict(json.load(f)["codec"])
    mc = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_gen_layer=1, n_head=2, n_embd=32)
    model = AudioChatModel(mc)
    ckpt = os.path.join(tmp, "ckpt.pt")
    save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), mc, TrainConfig(), tok, codec, 0, float("inf"))
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    judge()   # make sure the cache exists, then lend it
    shutil.copy(TEST_JUDGE, os.path.join(out, "judge.pt"))
    config = E.EvalConfig(ckpt=[ckpt], n=2, data_dir=os.path.join(tmp, "data"), out_dir=out, steps=2)
    results = E.evaluate(config)
    with open(os.path.join(out, "eval.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    assert os.path.isfile(os.path.join(out, "eval.png"))
    assert set(results) == {"judge", "n", "systems", "denoiser", "listening"} and results["judge"]["frameF1"] >= 85 and results["n"] == 2
    profile = results["denoiser"]["audiochat"]   # untrained: v = 0, so its estimate is alpha x_t and knows nothing
    assert profile["x0_error"][1.0] >= 0.9
    assert profile["seed_error"] < 0.5 and profile["seed_multiFLAM"] >= 50   # another seed: nearly the same audio
    with open(os.path.join(out, "report.html")) as f:   # the page, and every file it plays or shows
        page = f.read()
    linked = re.findall(r'src="([^"]+)"', page) + re.findall(r"src='([^']+)'", page)
    assert sum(link.endswith(".wav") for link in linked) >= 4 and "Dialogue 2" in page and "AudioChat-mini" in page
    assert all(os.path.isfile(os.path.join(out, link)) for link in linked), linked
    assert list(results["systems"]) == ["ground_truth", "audiochat", "cascade", "cascade_no_context"]
    for name, r in results["systems"].items():
        assert set(r) == {"storytelling", "editing", "understanding"}
        assert set(r["editing"]) == {"overall", "add", "remove", "change", "volume", "move", "multi"}
        assert {"multiFLAM", "KAD", "planValidity", "planRecall", "latency_s", "rtf"} <= set(r["storytelling"])
        assert {"editFLAM", "deltaMultiFLAM", "KAD"} <= set(r["editing"]["overall"])
        assert set(r["understanding"]) == {"tcpWER", "captionMultiFLAM"}
    gt, model_row = results["systems"]["ground_truth"], results["systems"]["audiochat"]
    assert gt["storytelling"]["planValidity"] == 100 and gt["storytelling"]["KAD"] is None
    assert model_row["storytelling"]["planValidity"] == 0 and model_row["storytelling"]["multiFLAM"] == 0
    assert model_row["editing"]["overall"]["editFLAM"] == 0
    failed = model_row["storytelling"]["planFailures"]   # an untrained model writes no JSON
    assert set(failed) == set(E.PLAN_FAILURES) and failed["not JSON"] == results["n"] and sum(failed.values()) == results["n"]
    assert model_row["editing"]["overall"]["deltaMultiFLAM"] is None   # no audio: nothing kept, nothing measured
    assert results["systems"]["cascade"]["understanding"]["tcpWER"] is None
    shutil.rmtree(tmp)


# -----------------------------------------------------------------------------
# speed benchmarks (eval.py --bench): the machinery, and the equivalences the comparisons rest on.
# Never the timings themselves.

class one_thread:
    """with one_thread(): ... -- ops this small only lose time to thread hand-offs on a busy machine."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def test_bench_cached_and_recomputed_paths_agree():
    """Each cache of --bench is timed against recomputing everything, so both sides must compute
    the same thing: greedy decoding picks the same tokens with and without the KV cache; an audio
    span sampled after a context that holds an earlier span gives the same latents with and
    without the prefix cache (guided or not, DDIM and DPM-Solver++); and the causal-LM baseline is
    the model's own text path (dense: the text head on the top layer, where causal_lm_loss reads)."""
    import torch.nn.functional as F
    model = tiny_model()
    prompt = torch.randint(0, 38, (9,), generator=torch.Generator().manual_seed(0)).tolist()
    with one_thread():
        cached, recomputed = (E.greedy_decode(model, prompt, 12, cached=c) for c in (True, False))
    assert len(cached) == 12 and cached == recomputed, (cached, recomputed)
    tokens, audio, span_id = random_sequence([("text", 5), ("audio", 4), ("text", 3)], seed=6)
    prefix = {"tokens": tokens, "audio": audio, "span_id": span_id, "is_plain_text": span_id < 0}
    for sampler, scale in (("ddim", 3.0), ("dpmpp", 3.0), ("dpmpp", 1.0)):
        with one_thread():
            x = [E.sample_span(model, prefix, 5, 4, sampler, scale, 38, torch.Generator().manual_seed(1), cached=c)
                 for c in (True, False)]
        assert x[0].shape == (1, 5, 8) and torch.allclose(x[0], x[1], atol=1e-5), (sampler, scale, (x[0] - x[1]).abs().max())
    dense = tiny_model(arch="dense")
    dense.shift = None   # the baseline is a plain GPT: no token shift
    toks = torch.randint(0, 38, (2, 11), generator=torch.Generator().manual_seed(2))
    logits, _ = dense(toks, torch.zeros(2, 11, 8), torch.zeros(2, 11), torch.full((2, 11), -1))
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten())
    assert torch.allclose(E.causal_lm_loss(dense, toks), ce, atol=1e-6)


def _bench_numbers(x, key=""):
    """(key, number) for every number in a nested bench.json value (booleans are not numbers)."""
    if isinstance(x, dict):
        return [kv for k, v in x.items() for kv in _bench_numbers(v, k)]
    if isinstance(x, list):
        return [kv for v in x for kv in _bench_numbers(v, key)]
    return [(key, x)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_bench_quick_writes_bench_json():
    """`eval.py --bench` at tiny sizes (QUICK_BENCH), without a checkpoint (6e skipped, a random
    model) and with one (an untrained tiny checkpoint and an untrained judge: the machinery, not
    the quality): bench.json holds every section's keys, and every figure is finite and positive
    (scores and skipped-block shares may be 0; what cannot be measured here is null)."""
    from model import AudioChatModel, ModelConfig
    from train import TrainConfig, save_checkpoint
    with one_thread():
        out = os.path.join(TMP, "bench")
        from train import parse_config
        config = parse_config(E.EvalConfig, ["--bench", f"--out_dir={out}", "--steps=2", "--device=cpu"])
        assert config.bench and not config.ckpt
        results = E.bench(config, E.QUICK_BENCH)
        with open(os.path.join(out, "bench.json")) as f:
            assert json.load(f) == json.loads(json.dumps(results))
        assert set(results) == {"device", "torch", "ckpt", "sections_s", "attention", "training", "decoding",
                                "prefix_cache", "samplers", "end_to_end", "total_s"}
        assert set(results["sections_s"]) == {"attention", "training", "decoding", "prefix_cache", "end_to_end"}
        assert [r["tokens"] for r in results["attention"]["rows"]] == list(E.QUICK_BENCH.attn_lengths)
        for row in results["attention"]["rows"]:
            assert all(row[b]["fwd_ms"] > 0 for b in ("math", "sdpa", "flex")) and row["sdpa"]["fwd_bwd_ms"] > 0
            assert row["flex"]["fwd_bwd_ms"] is None   # no FlexAttention backward on CPU
        training = results["training"]
        assert training["audiochat"]["tokens_per_s"] > 0 and training["causal_lm"]["tokens_per_s"] > 0
        assert training["audiochat"]["mfu"] is None and training["slowdown"] > 0   # MFU: CUDA only
        assert {"kv_cache_tokens_per_s", "recompute_tokens_per_s", "speedup"} <= set(results["decoding"])
        assert [r["turn"] for r in results["prefix_cache"]["rows"]] == ["story", "edit 1"]
        assert {"cached_s", "recompute_s", "speedup", "context_tokens", "audio_tokens"} <= set(results["prefix_cache"]["rows"][0])
        assert "skipped" in results["samplers"]
        e2e = results["end_to_end"]
        assert len(e2e["stories"]) == 1 and not e2e["trained"]
        assert {"plan_s", "audio_s", "codec_s", "total_s", "duration_s", "rtf", "render_s", "render_rtf"} <= set(e2e["mean"])
        may_be_zero = {"flex_blocks_skipped", "multiFLAM", "stderr"}

        def check_numbers(results):
            for key, x in _bench_numbers(results):
                assert np.isfinite(x) and (x > 0 or (key in may_be_zero and x == 0)), (key, x)
        check_numbers(results)

        # with a checkpoint: 6e runs (judge cached in out_dir), 6f lets the model write its plan
        out = os.path.join(TMP, "bench_ckpt")
        os.makedirs(out, exist_ok=True)
        _, _, tok, codec = E.resimulated_test_dialogues(1, n_fit=2)
        mc = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_gen_layer=1, n_head=2, n_embd=32)
        model = AudioChatModel(mc)
        ckpt = os.path.join(out, "ckpt.pt")
        save_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()), mc, TrainConfig(), tok, codec, 0, float("inf"))
        j = E.Judge(width=16)
        torch.save({"model": j.state_dict(), "args": {"width": 16, "dilations": [c.dilation[0] for c in j.convs]},
                    "classes": E.CLASSES, "info": {"frameF1": 50.0}}, os.path.join(out, "judge.pt"))
        results = E.bench(E.EvalConfig(bench=True, ckpt=[ckpt], out_dir=out, steps=2, device="cpu"), E.QUICK_BENCH)
        samplers = results["samplers"]
        assert [(r["sampler"], r["steps"]) for r in samplers["rows"]] == [("ddim", 4), ("dpmpp", 2), ("dpmpp", 3)]
        assert samplers["episodes"] == 2 and all(0 <= r["multiFLAM"] <= 100 for r in samplers["rows"])
        assert samplers["fewest_dpmpp_steps_within_noise"] in (None, 2, 3)
        assert results["end_to_end"]["trained"] and results["ckpt"] == ckpt
        check_numbers(results)


# -----------------------------------------------------------------------------
# runner: plain python, no pytest needed

def main(filters):
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    if filters:
        tests = [(n, f) for n, f in tests if any(word in n for word in filters)]
    passed, failed = 0, []
    t_all = time.time()
    for name, fn in tests:
        t0 = time.time()
        torch.manual_seed(0)
        np.random.seed(0)
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # a failing test must not stop the others
            import traceback
            traceback.print_exc()
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f}s): {type(e).__name__}: {e}", flush=True)
    print(f"\ntotal {time.time() - t_all:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"{passed} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
