"""
Train AudioChat-mini: one Self-Cascaded Transformer learns to tell, edit and understand audio
stories with Audio Transfusion Forcing (text cross-entropy + 5 x v-prediction MSE).

    python train.py                                   # the preset for this machine (2-core CPU: minutes)
    python train.py --max_iters=50 --out_dir=out/smoke
    python train.py --init_from=resume --out_dir=out/smoke --max_iters=100
    python train.py --arch=dense --out_dir=out/dense  # the paper's ablations: one shared stack,
    python train.py --arch=mot --out_dir=out/mot      #   a mixture of transformers,
    python train.py --cot=false --out_dir=out/nocot   #   no chain of thought
    torchrun --nproc_per_node=2 train.py --device=cpu # DDP (gloo on CPU, nccl on GPU)
    python train.py --help                            # every flag, with what it does

If `--data_dir` holds no dataset, one is simulated first (simulate_data.py). The out dir receives
`ckpt.pt` (written atomically: model args, config, tokenizer, codec statistics, optimizer, step),
`log.csv` and `loss.png`. `--init_from=resume` continues exactly where the checkpoint stopped:
every batch and every noise draw is a pure function of (seed, step, rank), so there is no random
state to lose.

Read line by line: text_only, pack, collate, validate and the loop in train(). Skim: parse_config,
the checkpoint and log helpers, DDP set-up.
"""
import csv
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import simulate_data
from tokenizer import LATENT_DIM, BPETokenizer, AudioCodec, encode_dialogue
from model import ARCHS, ATTN_BACKENDS, ModelConfig, AudioChatModel
from diffusion import alpha_sigma, transfusion_forcing_loss


# -----------------------------------------------------------------------------
# configuration: a dataclass whose every field is a --flag (the one config mechanism of the project)

DTYPES = ("auto", "float32", "bfloat16")   # training precision (pick_dtype)
BF16_DEVICES = ("cuda", "cpu")            # where torch.autocast runs bf16 (not MPS)

def opt(default, help, choices=None, lo=None, hi=None):
    """A flag: its default, what it does, and what values it accepts (a set of choices or a range)."""
    return field(default=default, metadata={"help": help, "choices": choices, "lo": lo, "hi": hi})

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out", "where ckpt.pt, log.csv and loss.png go")
    data_dir: str = opt("data", "dataset written by simulate_data.py (simulated here if missing)")
    n_dialogues: int = opt(simulate_data.N_TRAIN, "training dialogues to simulate when data_dir holds none", lo=1)
    n_listen: int = opt(simulate_data.N_LISTEN, "understanding-only dialogues (2-6 clips each) to simulate with them", lo=0)
    init_from: str = opt("scratch", "start from scratch, or resume from out_dir/ckpt.pt", choices=("scratch", "resume"))
    preset: str = opt("auto", "defaults sized for the machine (flags still win)", choices=("auto", "cpu", "gpu"))
    # model (ModelConfig)
    arch: str = opt("sct", "sct (Self-Cascaded Transformer), dense (one shared stack) or mot (per-modality weights)",
                    choices=ARCHS)
    attn: str = opt("auto", "attention backend (auto: flex on CUDA, sdpa elsewhere)", choices=ATTN_BACKENDS)
    n_layer: int = opt(4, "U: understanding layers (the text head reads layer U)", lo=1)
    n_gen_layer: int = opt(2, "G: generation layers on top (the diffusion head reads layer U+G)", lo=0)
    n_head: int = opt(4, "attention heads (n_embd / n_head must be even: rotary positions)", lo=1)
    n_embd: int = opt(128, "model width", lo=2)
    block_size: int = opt(1024, "longest packed sequence, in tokens", lo=16)
    dropout: float = opt(0.0, "dropout probability", lo=0.0, hi=0.99)
    token_shift: bool = opt(True, "mix the previous token's embedding into each input (model.AudioChatModel.embed)")
    cot: bool = opt(True, "audio turns write tool calls and read the studio's plan first (false: the audio follows the request)")
    # optimisation
    batch_size: int = opt(4, "sequences per step per process", lo=1)
    max_iters: int = opt(2400, "training steps", lo=0)
    text_iters: int = opt(1500, "curriculum: the first steps see the dialogues without their audio (train.text_only)", lo=0)
    learning_rate: float = opt(2e-3, "peak learning rate (AdamW)", lo=0.0, hi=1.0)
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay", lo=0.0, hi=1.0)
    lr_decay_iters: int = opt(0, "length of the cosine decay (0 = max_iters; set it to stop early and resume later)", lo=0)
    warmup_iters: int = opt(50, "linear warm-up steps", lo=0)
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices", lo=0.0)
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)", lo=0.0)
    # Audio Transfusion Forcing
    lambda_audio: float = opt(5.0, "weight of the audio v-MSE against the text cross-entropy", lo=0.0)
    cfg_drop_p: float = opt(0.1, "probability of dropping a sample's text to <|null|> (for CFG)", lo=0.0, hi=1.0)
    noise_shift: float = opt(3.0, "noise-level shift in training (diffusion.shift_noise_level; 1 = off)", lo=0.01, hi=100.0)
    # logging and evaluation
    eval_interval: int = opt(200, "steps between validation and checkpoint", lo=1)
    eval_iters: int = opt(8, "validation batches", lo=1)
    log_interval: int = opt(10, "steps between progress-bar updates", lo=1)
    # system
    device: str = opt("auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    dtype: str = opt("auto", "precision of the forward and backward (autocast; weights and AdamW stay float32): auto picks "
                     "bfloat16 on CUDA, and on a CPU from width 256 if its bf16 matmul is >= 1.5x float32's", choices=DTYPES)
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(1337, "seed of every random draw", lo=0, hi=2**31 - 1)

PRESETS = {  # applied under --preset, before the flags
    "cpu": dict(),
    # one GPU, sized for a short slot (the README's GPU table)
    "gpu": dict(n_layer=8, n_gen_layer=4, n_head=8, n_embd=512, batch_size=16, max_iters=2000, text_iters=300,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, n_dialogues=10000,
                n_listen=2500),
}

def accepted(f):
    """The values a flag accepts, in words ("" when any value of its type will do)."""
    m = f.metadata
    if m.get("choices"):
        return " | ".join(map(str, m["choices"]))
    if m.get("lo") is None:
        return ""
    return f">= {m['lo']}" if m.get("hi") is None else f"{m['lo']}..{m['hi']}"

def parse_config(cls, argv, presets=None):
    """Command-line flags -> a cls instance: `--key=value` or `--key value`, a bare `--flag` for a
    bool, and a repeated `--key` for a list field. Unknown keys, wrong types, values off a flag's
    choices or out of its range all exit with one line ("error: ..."), before any work starts;
    --help lists every field with its default, what it accepts and what it does."""
    prog = os.path.basename(sys.argv[0])
    if "--help" in argv or "-h" in argv:
        print(f"usage: python {prog} [--key=value ...]\n")
        for f in fields(cls):
            rule = accepted(f)
            print(f"  --{f.name}={f.default}".ljust(28) + f" {f.metadata.get('help', '')}" + (f" [{rule}]" if rule else ""))
        sys.exit(0)
    known = {f.name: f for f in fields(cls)}
    config = cls()
    overrides, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in known:
            sys.exit(f"error: unknown argument {arg!r} (python {prog} --help lists them)")
        kind = known[key].type
        if kind is bool and not eq:
            value = "true"
        elif not eq:
            if not args or args[0].startswith("--"):
                sys.exit(f"error: --{key} needs a value: --{key}=...")
            value = args.pop(0)
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                sys.exit(f"error: --{key} expects true or false, got {value!r}")
            overrides[key] = value.lower() in ("true", "1")
        elif kind is list:
            overrides.setdefault(key, []).append(value)
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                sys.exit(f"error: --{key} expects {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(overrides[key]):
                sys.exit(f"error: --{key} expects a finite number, got {value!r}")
    if presets is not None:
        preset = overrides.get("preset", config.preset)
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() else "cpu"
        for key, value in presets.get(preset, {}).items():   # an unknown preset is refused below, with the other flags
            setattr(config, key, value)
    for key, value in overrides.items():
        setattr(config, key, value)
    for f in fields(cls):
        m, value = f.metadata, getattr(config, f.name)
        if f.type is str and f.name in overrides and not value.strip():   # given, but empty: never meant
            sys.exit(f"error: --{f.name} is empty: give a value ({m['help']}) or leave the flag out")
        if f.name.endswith("_dir") and value:   # a folder we may have to create: fail now, not after minutes of work
            parent = os.path.abspath(value)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent) or (parent != os.path.abspath(value) and not os.access(parent, os.W_OK)):
                sys.exit(f"error: --{f.name}={value} cannot be a folder here ({parent!r} is "
                         f"{'a file' if not os.path.isdir(parent) else 'not writable'})")
        if ((m.get("choices") and value not in m["choices"]) or (m.get("lo") is not None and value < m["lo"])
                or (m.get("hi") is not None and value > m["hi"])):
            sys.exit(f"error: --{f.name}={value} is not accepted: use {accepted(f)} ({m['help']})")
    return config

def one_line(e):
    """An exception as one short line, for an error message: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"

def pick_device(name):
    """'auto' -> cuda, then mps, then cpu; a named device that this machine lacks exits with one line."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}  # in that order
    if name == "auto":
        return next(kind for kind, ok in available.items() if ok)
    try:
        kind = torch.device(name).type
    except RuntimeError:
        sys.exit(f"error: --device={name} is not a device: use auto, cpu, cuda, cuda:N or mps")
    if not available.get(kind):
        sys.exit(f"error: --device={name} is not available on this machine (--device=auto picks one that is)")
    return name


# -----------------------------------------------------------------------------
# data: simulated dialogues -> token sequences -> packed rows

def load_tokenizers(data_dir):
    """-> (BPETokenizer, AudioCodec) of a dataset written by simulate_data.write_dataset; one clear error if unreadable."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            codec = AudioCodec.from_state_dict(json.load(f)["codec"])
        return BPETokenizer.load(os.path.join(data_dir, "tokenizer.json")), codec
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {data_dir!r} holds no readable dataset ({one_line(e)}); "
                 f"delete it, or give another --data_dir, to simulate one")

def read_split(data_dir, split, required=True):
    """The one reader of a dataset: (dialogue dict, its audio [(T, 64) frames]) of one split, in order,
    a shard read only when it is reached. One clear error for a split with no shards, if required."""
    shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.pt")))
    if not shards and required:
        sys.exit(f"error: no {split} shards in {data_dir!r} (python simulate_data.py {data_dir})")
    for path in shards:
        shard = torch.load(path, weights_only=True)
        yield from ((json.loads(text), raws) for text, raws in zip(shard["dialogues"], shard["audio"]))

def load_dataset(data_dir, split, tok, codec, required=True, cot=True):
    """Every dialogue of one split as an encode_dialogue sequence (dict of tensors, see tokenizer.py)."""
    return [encode_dialogue(dialogue, [codec.normalize(raw.float()) for raw in raws], tok, cot)
            for dialogue, raws in read_split(data_dir, split, required)]

def user_audio(seq):
    """(L,) bool: the positions of audio the user supplied (an encode_dialogue dict's spans that
    are conditioning, not the assistant's diffusion targets)."""
    span = seq["span_id"]
    return (span >= 0) & ~seq["span_is_target"][span.clamp(min=0)]

def text_only(seq):
    """Stage 1 of the curriculum: a dialogue (encode_dialogue dict) with its audio spans cut out,
    their <|audio|> and <|/audio|> markers kept, and the answer about a user's clip not learned
    (without the clip it could only be guessed). Audio is most of a dialogue's tokens, so on text
    alone the same compute shows more dialogues (the paper trains in stages too)."""
    text_target = seq["text_target"].clone()
    heard = user_audio(seq)
    if heard.any():   # the user's clip comes last (simulate_data.make_dialogue): mask from there on
        text_target[int(heard.nonzero()[0]):] = False
    keep = seq["span_id"] < 0
    text = {key: seq[key][keep] for key in ("tokens", "audio", "span_id", "is_plain_text")}
    return dict(text, text_target=text_target[keep], span_is_target=seq["span_is_target"][:0])

def pack(seqs, block_size, seed):
    """First-fit packing of whole dialogues into rows of at most block_size tokens -> list of rows,
    each a list of indices into seqs. Dialogues never split: a row's doc_id keeps them apart in
    attention (see model.transfusion_mask)."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    fits = [i for i in order if len(seqs[i]["tokens"]) <= block_size]
    if len(fits) < len(order):
        print(f"note: {len(order) - len(fits)} of {len(seqs)} dialogues exceed block_size={block_size} and are left out")
    rows, room = [], []
    for i in fits:
        n = len(seqs[i]["tokens"])
        for r in range(len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(block_size - n)
    return rows

def collate(rows, pad_id):
    """rows: list of B rows, each a list of tokenizer.encode_dialogue dicts packed one after the
    other into that row ([[seq] for seq in seqs]: one dialogue per row). Returns a dict of (B, ...)
    tensors, padded at the end of each row to the longest:

        tokens (B, L) long          text ids; audio positions and padding hold pad_id
        audio (B, L, latent)        clean latents at audio positions, 0 elsewhere
        span_id (B, L) long         -1 for text and padding, 0, 1, ... per audio span of the row
        span_is_target (B, S) bool  span made by the assistant (diffusion loss) or supplied by the
                                    user (conditioning); padded with False, S >= 1
        text_target (B, L) bool     True where tokens[:, i + 1] is a learned assistant token
        is_plain_text (B, L) bool   words that classifier-free guidance may drop to <|null|>
        doc_id (B, L) long          which dialogue of the row each token belongs to (the mask keeps
                                    them apart); -1 for padding
        is_pad (B, L) bool          padding at the end of a row
    """
    L = max(sum(len(d["tokens"]) for d in row) for row in rows)
    S = max(1, max(sum(len(d["span_is_target"]) for d in row) for row in rows))
    B, latent = len(rows), rows[0][0]["audio"].size(1)
    batch = {
        "tokens": torch.full((B, L), pad_id, dtype=torch.long),
        "audio": torch.zeros(B, L, latent),
        "span_id": torch.full((B, L), -1, dtype=torch.long),
        "span_is_target": torch.zeros(B, S, dtype=torch.bool),
        "text_target": torch.zeros(B, L, dtype=torch.bool),
        "is_plain_text": torch.zeros(B, L, dtype=torch.bool),
        "doc_id": torch.full((B, L), -1, dtype=torch.long),
    }
    for b, row in enumerate(rows):
        i = n_spans = 0
        for doc, d in enumerate(row):
            n, s = len(d["tokens"]), len(d["span_is_target"])
            for key in ("tokens", "audio", "text_target", "is_plain_text"):
                batch[key][b, i:i + n] = d[key]
            # span ids count across the dialogues of a row, so that they index span_is_target
            batch["span_id"][b, i:i + n] = torch.where(d["span_id"] >= 0, d["span_id"] + n_spans, -1)
            batch["span_is_target"][b, n_spans:n_spans + s] = d["span_is_target"]
            batch["doc_id"][b, i:i + n] = doc
            i, n_spans = i + n, n_spans + s
    batch["is_pad"] = batch["doc_id"] < 0
    return batch

def get_batch(seqs, rows, batch_size, generator, pad_id, device):
    """Draw batch_size packed rows with `generator` and collate them to padded (B, L) tensors."""
    picks = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
    batch = collate([[seqs[i] for i in rows[r]] for r in picks], pad_id)
    return {k: v.to(device) for k, v in batch.items()}

def ensure_dataset(config):
    """Simulate a dataset into config.data_dir if it holds none (rank 0 only; the others wait).
    One that is there is used as it is, with a note if it is smaller than n_dialogues or n_listen asks."""
    meta_path = os.path.join(config.data_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            counts = json.load(f)["counts"]
        for split, asked in (("train", config.n_dialogues), ("listen", config.n_listen)):   # more is used as it is
            if counts.get(split, 0) < asked:
                print(f"note: {config.data_dir!r} holds {counts.get(split, 0)} {split} dialogues, fewer than the {asked} "
                      f"this run asks for; training on them (a new --data_dir simulates {asked})")
        return
    listening = f" and {config.n_listen} listening dialogues" if config.n_listen else ""
    print(f"no dataset in {config.data_dir!r}: simulating {config.n_dialogues} dialogues{listening} first")
    simulate_data.write_dataset(config.data_dir, n=config.n_dialogues, n_listen=config.n_listen)


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, one format read by sample.py and eval.py

def model_config(config, vocab_size, latent_dim=LATENT_DIM):
    """TrainConfig -> the ModelConfig it trains, from the flags of the same names (ValueError, naming the
    flags, for a shape that cannot work)."""
    flags = {f.name: getattr(config, f.name) for f in fields(ModelConfig) if f.name not in ("vocab_size", "latent_dim")}
    return ModelConfig(vocab_size=vocab_size, latent_dim=latent_dim, **flags)

def save_checkpoint(path, model, optimizer, model_config, config, tok, codec, iter_num, val):
    """Everything needed to sample, evaluate or resume, written atomically (a crash mid-write
    leaves the previous checkpoint intact). val: the last validation (see `validate`)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": asdict(model_config),
            "config": asdict(config), "tokenizer": tok.state_dict(), "codec": codec.state_dict(),
            "iter_num": iter_num, "val": val}
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)

def read_checkpoint(path, device="cpu"):
    """-> the checkpoint dict. A missing, unreadable or foreign file is one clear error, never a traceback."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {path!r} is a folder; a checkpoint is a file such as {os.path.join(path, 'ckpt.pt')!r}")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path!r} (train.py --out_dir={os.path.dirname(path) or '.'} writes one)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path!r} is not a readable AudioChat-mini checkpoint ({one_line(e)})")
    keys = {"model", "optimizer", "model_args", "config", "tokenizer", "codec", "iter_num"}
    missing = keys - set(ckpt) if isinstance(ckpt, dict) else keys
    if missing:
        raise SystemExit(f"error: {path!r} is not an AudioChat-mini checkpoint (it lacks {sorted(missing)})")
    return ckpt

def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, tok, codec, ckpt). A missing or corrupt file is one clear error."""
    ckpt = read_checkpoint(path, device)
    try:
        model = AudioChatModel(ModelConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
        tok = BPETokenizer.from_state_dict(ckpt["tokenizer"])
        codec = AudioCodec.from_state_dict(ckpt["codec"])
    except Exception as e:
        raise SystemExit(f"error: {path!r} is not an AudioChat-mini checkpoint of this version ({one_line(e)})")
    return model.to(device).eval(), tok, codec, ckpt


# -----------------------------------------------------------------------------
# logging: log.csv and loss.png

X0_BINS = 5   # validation bins the x0-hat error by noise level t: [0, .2), [.2, .4), ... [.8, 1]
LOG_FIELDS = ["iter", "lr", "loss", "ce", "mse", "val_loss", "val_ce", "val_mse",
              *[f"val_x0_t{k}" for k in range(X0_BINS)], "elapsed_s"]

def plot_losses(log_path, png_path):
    """log.csv -> loss.png: text CE and audio v-MSE (train and validation) by step, and the last
    validation's x0-hat error by noise level (how much of a clip the model can draw from t)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, key, title in [(axes[0], "ce", "text cross-entropy"), (axes[1], "mse", "audio v-MSE")]:
        for prefix, style, label in (("", "-", "train"), ("val_", "o-", "val")):
            pts = [(int(r["iter"]), float(r[prefix + key])) for r in rows if r[prefix + key] and float(r[prefix + key]) > 0]
            if pts:
                ax.plot(*zip(*pts), style, label=label, lw=1)
        ax.set(title=title, xlabel="step", yscale="log")
        ax.legend()
    validated = [r for r in rows if r["val_x0_t0"]]
    if validated:
        centers = [(k + 0.5) / X0_BINS for k in range(X0_BINS)]
        axes[2].plot(centers, [float(validated[-1][f"val_x0_t{k}"]) for k in range(X0_BINS)], "o-")
    axes[2].set(title="x0-hat error / data power, last validation", xlabel="noise level t", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

def step_generator(seed, step, rank):
    """The random source of one training step: a pure function of (seed, step, rank), so resuming is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)

def learning_rate(config, it):
    """Linear warm-up, then cosine decay to min_lr (nanoGPT)."""
    if it < config.warmup_iters:
        return config.learning_rate * (it + 1) / (config.warmup_iters + 1)
    decay_iters = config.lr_decay_iters or config.max_iters
    progress = min(1.0, (it - config.warmup_iters) / max(1, decay_iters - config.warmup_iters))
    return config.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (config.learning_rate - config.min_lr)


# -----------------------------------------------------------------------------
# the training loop

def median_time(fn, device, repeats=3, warmup=1):
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones (compilation, allocator
    growth), the device synchronised before each clock read: CUDA and MPS run asynchronously."""
    sync = {"cuda": lambda: torch.cuda.synchronize(device), "mps": lambda: torch.mps.synchronize()}.get(
        device.split(":")[0], lambda: None)
    times = []
    for _ in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times[warmup:])[repeats // 2]

def matmul_flops(device, dtype, m, k, n):
    """FLOP/s of an (m x k) @ (k x n) matmul in dtype ("float32" | "bfloat16") on device (median_time of 5)."""
    a, b = (torch.randn(*shape, device=device, dtype=getattr(torch, dtype)) for shape in ((m, k), (k, n)))
    return 2 * m * k * n / median_time(lambda: a @ b, device, repeats=5)

def pick_dtype(name, device, n_embd):
    """--dtype -> "float32" or "bfloat16". auto: bfloat16 on CUDA; on a CPU, bfloat16 from width 256 up, if
    a matmul there (4096 x n_embd @ n_embd x 4 n_embd) runs >= 1.5x faster in it than in float32 (CPUs with
    AMX or AVX512-BF16 do; others emulate bf16, slowly). Below width 256 a CPU step is attention and
    bookkeeping more than matmuls, where bf16 gains little. MPS: float32."""
    if name != "auto":
        return name
    if device.startswith("cuda"):
        return "bfloat16"
    if not device.startswith(BF16_DEVICES) or n_embd < 256:
        return "float32"
    bf16, fp32 = (matmul_flops("cpu", d, 4096, n_embd, 4 * n_embd) for d in ("bfloat16", "float32"))
    return "bfloat16" if bf16 >= 1.5 * fp32 else "float32"

def autocast_for(device, dtype):
    """Mixed precision (dtype "bfloat16"): torch.autocast runs matmuls and attention in bf16 and keeps
    reductions in float32 (the losses cast to float32 themselves); a no-op context for "float32"."""
    return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

def batch_loss(model, seqs, rows, config, tok, generator, device, cfg_drop_p, per_token=False):
    """Draw a batch of packed rows with `generator` -> transfusion_forcing_loss on it, under autocast_for
    (config.dtype: pick_dtype's answer by then)."""
    batch = get_batch(seqs, rows, config.batch_size, generator, tok.special("<|pad|>"), device)
    with autocast_for(device, config.dtype):
        return transfusion_forcing_loss(model, batch, null_id=tok.special("<|null|>"), lambda_audio=config.lambda_audio,
                                        cfg_drop_p=cfg_drop_p, noise_shift=config.noise_shift, generator=generator,
                                        per_token=per_token)

@torch.no_grad()
def validate(model, seqs, rows, config, tok, device):
    """Mean loss, ce and mse over config.eval_iters fixed validation batches (no CFG dropout), and
    x0_err: per noise-level bin, sum(sigma^2 v-MSE) / sum(x0^2) over the target audio tokens whose
    t falls in it (x0 = alpha x_t - sigma v, so an x0 error is sigma times the v error; NaN for an
    empty bin). Near t = 1 it says how much of a clip the model draws from the plan alone.
    -> {"loss", "ce", "mse": float, "x0_err": [X0_BINS floats]}."""
    model.eval()
    totals, err, power = torch.zeros(3), torch.zeros(X0_BINS), torch.zeros(X0_BINS)
    for k in range(config.eval_iters):
        g = step_generator(config.seed + 1, k, 0)  # the same batches at every validation
        *losses, per = batch_loss(model, seqs, rows, config, tok, g, device, cfg_drop_p=0.0, per_token=True)
        totals += torch.tensor([float(x) for x in losses])
        target = per["is_target"]
        t = per["t"][target].float().cpu()
        bins = (t * X0_BINS).long().clamp(max=X0_BINS - 1)
        err.index_add_(0, bins, (alpha_sigma(t)[1] ** 2 * per["mse"][target].float().cpu()))
        power.index_add_(0, bins, per["x0_power"][target].float().cpu())
    model.train()
    loss, ce, mse = (totals / config.eval_iters).tolist()
    return {"loss": loss, "ce": ce, "mse": mse, "x0_err": (err / power).tolist()}  # 0 / 0 = NaN: an empty bin

def check_config(config, device):
    """Refuse, with one line each, what the flags alone show cannot work: a model shape, flex
    attention off CUDA (FlexAttention has no backward there), bf16 on MPS."""
    try:
        model_config(config, vocab_size=1)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if config.attn == "flex" and not device.startswith("cuda"):
        raise SystemExit(f"error: --attn=flex trains only on CUDA (PyTorch has no FlexAttention backward on "
                         f"{device.split(':')[0]}); use --attn=sdpa (fast) or --attn=math (readable)")
    if config.dtype == "bfloat16" and not device.startswith(BF16_DEVICES):
        raise SystemExit(f"error: --dtype=bfloat16 trains on CUDA or a CPU; use --dtype=float32 on {device}")

def train(config):
    """Run training as config says; returns the list of log rows (dicts, one per step)."""
    from tqdm import tqdm
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = 0
    device = pick_device(config.device)
    check_config(config, device)
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    log_path = os.path.join(config.out_dir, "log.csv")
    ckpt = None
    if config.init_from == "resume":  # checked before anything is built or written
        ckpt = read_checkpoint(ckpt_path)
        args = ckpt["model_args"]
        if args != asdict(model_config(config, args["vocab_size"], args["latent_dim"])):
            raise SystemExit(f"error: {ckpt_path} was trained with other model flags: {args}")
        if ckpt["iter_num"] >= config.max_iters:
            raise SystemExit(f"error: {ckpt_path} is already at step {ckpt['iter_num']}, so --max_iters={config.max_iters} "
                             f"has nothing left to train (give a larger --max_iters; nothing was changed)")
        if config.dtype == "auto":   # a resumed run keeps the precision it ran in
            config.dtype = ckpt["config"].get("dtype", "auto")
    config.dtype = pick_dtype(config.dtype, device, config.n_embd)   # resolved once: the checkpoint records what ran
    if ddp:
        import torch.distributed as dist
        on_gpu = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if on_gpu else "gloo")
        rank = dist.get_rank()
        if on_gpu:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
    master = rank == 0
    torch.manual_seed(config.seed)
    if master:
        try:
            os.makedirs(config.out_dir, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot make --out_dir={config.out_dir} ({e.strerror})")
        ensure_dataset(config)
    if ddp:
        dist.barrier()

    tok, codec = load_tokenizers(config.data_dir)
    train_seqs = load_dataset(config.data_dir, "train", tok, codec, cot=config.cot)
    train_seqs += load_dataset(config.data_dir, "listen", tok, codec, required=False)
    val_seqs = load_dataset(config.data_dir, "val", tok, codec, cot=config.cot)
    train_rows = pack(train_seqs, config.block_size, config.seed)
    val_rows = pack(val_seqs, config.block_size, config.seed)
    if not train_rows or not val_rows:
        shortest = min(len(s["tokens"]) for s in (val_seqs if train_rows else train_seqs))
        raise SystemExit(f"error: no dialogue fits in --block_size={config.block_size} (the shortest has {shortest} tokens)")
    mconf = model_config(config, tok.vocab_size, train_seqs[0]["audio"].shape[-1])
    model = AudioChatModel(mconf).to(device)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (0.9, 0.95), device.split(":")[0])
    iter_num, val, log_rows = 0, None, []
    if ckpt is not None:
        if ckpt["model_args"] != asdict(mconf):
            raise SystemExit(f"error: {ckpt_path} was trained on another dataset's vocabulary: {ckpt['model_args']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, val = ckpt["iter_num"], ckpt.get("val")
        if os.path.exists(log_path):
            with open(log_path) as f:  # keep the log consistent with the checkpoint we resume from
                log_rows = [r for r in csv.DictReader(f) if int(r["iter"]) < iter_num]
        del ckpt

    text_seqs, text_rows = [], []
    if iter_num < config.text_iters:  # a run resumed past the text stage never needs its rows
        text_seqs = [t for t in map(text_only, train_seqs) if t["text_target"].any()]  # listening dialogues: nothing
        text_rows = pack(text_seqs, config.block_size, config.seed)

    if master:
        print(f"{config.arch} model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device} "
              f"({config.dtype}); "
              f"{len(train_seqs)} train dialogues packed in {len(train_rows)} rows of <= {config.block_size} tokens")
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        # find_unused_parameters: a batch with no audio to learn (the text stage) leaves the
        # generation layers and the diffusion head out of the graph (model.forward's layers="text")
        model = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
                                        find_unused_parameters=config.text_iters > iter_num)

    def validation_row(it, **extra):
        nonlocal val
        val = validate(raw_model, val_seqs, val_rows, config, tok, device)
        return {"iter": it, "val_loss": val["loss"], "val_ce": val["ce"], "val_mse": val["mse"],
                **{f"val_x0_t{k}": e for k, e in enumerate(val["x0_err"])}, **extra}

    def checkpoint(it, row):
        save_checkpoint(ckpt_path, raw_model, optimizer, mconf, config, tok, codec, it, val)
        with open(log_path, "w", newline="") as f:  # with this step's validation, before its training
            writer = csv.DictWriter(f, LOG_FIELDS, restval="")
            writer.writeheader()
            writer.writerows(log_rows + [row])
        plot_losses(log_path, os.path.join(config.out_dir, "loss.png"))

    t0 = time.time() - (float(log_rows[-1]["elapsed_s"]) if log_rows else 0.0)
    bar = tqdm(range(iter_num, config.max_iters), initial=iter_num, total=config.max_iters,
               disable=not master, desc="train", dynamic_ncols=True)
    for it in bar:
        row = {"iter": it}
        if it % config.eval_interval == 0 and master:
            row = validation_row(it)
            if it > iter_num or (it == 0 and not log_rows):
                checkpoint(it, row)
        lr = learning_rate(config, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = step_generator(config.seed, it, rank)
        stage = (text_seqs, text_rows) if it < config.text_iters else (train_seqs, train_rows)
        loss, ce, mse = batch_loss(model, *stage, config, tok, g, device, config.cfg_drop_p)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        row.update(lr=lr, loss=loss.item(), ce=ce.item(), mse=mse.item(), elapsed_s=round(time.time() - t0, 2))
        log_rows.append(row)
        if it % config.log_interval == 0:
            bar.set_postfix(ce=f"{row['ce']:.3f}", mse=f"{row['mse']:.3f}", lr=f"{lr:.1e}")
    if master:
        row = validation_row(config.max_iters, elapsed_s=round(time.time() - t0, 2))
        checkpoint(config.max_iters, row)
        log_rows.append(row)
        print(f"done: val ce {val['ce']:.3f}, val mse {val['mse']:.3f}, x0 error at t in [0.8, 1] {val['x0_err'][-1]:.2f}; "
              f"wrote {ckpt_path}, {log_path}, loss.png")
    if ddp:
        dist.destroy_process_group()
    return log_rows

if __name__ == "__main__":
    train(parse_config(TrainConfig, sys.argv[1:], PRESETS))
