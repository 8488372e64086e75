"""
Train AudioChat-mini: one Self-Cascaded Transformer learns to tell, edit and understand audio
stories with Audio Transfusion Forcing (text cross-entropy + 5 x v-prediction MSE).

    python train.py                                   # the preset for this machine (2-core CPU: minutes)
    python train.py --max_iters=50 --out_dir=out/smoke
    python train.py --init_from=resume --out_dir=out/smoke --max_iters=100
    python train.py --arch=dense --out_dir=out/dense  # the paper's ablation: one shared stack
    torchrun --nproc_per_node=2 train.py --device=cpu # DDP (gloo on CPU, nccl on GPU)
    python train.py --help                            # every flag, with what it does

If `--data_dir` holds no dataset, one is simulated first (simulate_data.py). The out dir receives
`ckpt.pt` (written atomically: model args, config, tokenizer, codec statistics, optimizer, step),
`log.csv` and `loss.png`. `--init_from=resume` continues exactly where the checkpoint stopped:
every batch and every noise draw is a pure function of (seed, step, rank), so there is no random
state to lose.
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

from tokenizer import BPETokenizer, AudioCodec, encode_dialogue
from model import ModelConfig, AudioChatModel
from diffusion import collate, transfusion_forcing_loss


# -----------------------------------------------------------------------------
# configuration: a dataclass whose every field is a --flag (the one config mechanism of the project)

def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = opt("out", "where ckpt.pt, log.csv and loss.png go")
    data_dir: str = opt("data", "dataset written by simulate_data.py (simulated here if missing)")
    n_dialogues: int = opt(3000, "training dialogues to simulate when data_dir holds none")
    n_listen: int = opt(1500, "understanding-only training dialogues (2-6 clips each) to simulate with them (README: The understanding)")
    init_from: str = opt("scratch", "scratch | resume (from out_dir/ckpt.pt)")
    preset: str = opt("auto", "auto | cpu | gpu: defaults sized for the machine (flags still win)")
    # model (ModelConfig)
    arch: str = opt("sct", "sct (Self-Cascaded Transformer) | dense (one shared stack)")
    attn: str = opt("auto", "attention backend: auto | math | sdpa | flex")
    n_layer: int = opt(4, "U: understanding layers (the text head reads layer U)")
    n_gen_layer: int = opt(2, "G: generation layers on top (the diffusion head reads layer U+G)")
    n_head: int = opt(4, "attention heads")
    n_embd: int = opt(128, "model width")
    block_size: int = opt(1024, "longest packed sequence, in tokens (a simulated dialogue has ~560 on average)")
    positions: str = opt("rope", "rope (rotary: attention sees relative positions) | learned (a position table; README: The understanding)")
    dropout: float = opt(0.0, "dropout probability")
    token_shift: bool = opt(True, "mix the previous token's embedding into each input (model.AudioChatModel.embed)")
    # optimisation
    batch_size: int = opt(4, "sequences per step per process")
    max_iters: int = opt(1200, "training steps")
    text_iters: int = opt(300, "curriculum: the first steps see the dialogues without their audio (train.text_only)")
    learning_rate: float = opt(2e-3, "peak learning rate (AdamW)")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay")
    lr_decay_iters: int = opt(0, "length of the cosine decay (0 = max_iters; set it to stop early and resume later)")
    warmup_iters: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices")
    grad_clip: float = opt(1.0, "clip the global gradient norm (0 = off)")
    # Audio Transfusion Forcing
    lambda_audio: float = opt(5.0, "weight of the audio v-MSE against the text cross-entropy")
    cfg_drop_p: float = opt(0.1, "probability of dropping a sample's text to <|null|> (for CFG)")
    per_frame_noise: bool = opt(False, "one noise level per audio token instead of per span")
    noise_shift: float = opt(3.0, "train at noise levels shifted towards noise (diffusion.shift_noise_level; 1 = off)")
    # logging and evaluation
    eval_interval: int = opt(200, "steps between validation and checkpoint")
    eval_iters: int = opt(8, "validation batches")
    log_interval: int = opt(10, "steps between progress-bar updates")
    # system
    device: str = opt("auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(1337, "seed of every random draw")


PRESETS = {  # applied under --preset, before the flags
    "cpu": dict(),
    # one GPU, sized for a short slot: ~4 min on an H100 with simulation and evaluation (README)
    "gpu": dict(n_layer=8, n_gen_layer=4, n_head=8, n_embd=512, batch_size=16, max_iters=2000,
                learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250, n_dialogues=10000,
                n_listen=0),   # as measured on an H100 (README); listening dialogues are untried on a GPU
}


def parse_config(cls, argv, presets=None):
    """Command-line flags -> a cls instance: `--key=value` or `--key value`, a bare `--flag` for a
    bool, and a repeated `--key` for a list field. Types are checked, unknown keys are rejected
    with a one-line error, --help lists every field with its help and default."""
    if "--help" in argv or "-h" in argv:
        print(f"usage: python {os.path.basename(sys.argv[0])} [--key=value ...]\n")
        for f in fields(cls):
            print(f"  --{f.name}={f.default!s:<14} {f.metadata.get('help', '')}")
        sys.exit(0)
    known = {f.name: f for f in fields(cls)}
    config = cls()
    overrides, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or key not in known:
            sys.exit(f"error: unknown argument {arg!r} (python {os.path.basename(sys.argv[0])} --help lists them)")
        kind = known[key].type
        if kind is bool and not eq:
            overrides[key] = True
            continue
        if not eq:
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
    if presets is not None:
        preset = overrides.get("preset", config.preset)
        if preset == "auto":
            preset = "gpu" if torch.cuda.is_available() else "cpu"
        if preset not in presets:
            sys.exit(f"error: unknown preset {preset!r}: choose among auto, {', '.join(presets)}")
        for key, value in presets[preset].items():
            setattr(config, key, value)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def pick_device(name):
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# -----------------------------------------------------------------------------
# data: simulated dialogues -> token sequences -> packed rows

def load_dataset(data_dir, split, tok, codec, required=True):
    """Every dialogue of one split as an encode_dialogue sequence (dict of tensors, see tokenizer.py)."""
    shards = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.pt")))
    if not shards and required:
        sys.exit(f"error: no {split} shards in {data_dir!r} (python simulate_data.py --out {data_dir})")
    seqs = []
    for path in shards:
        shard = torch.load(path, weights_only=True)
        for text, raws in zip(shard["dialogues"], shard["audio"]):
            latents = [codec.normalize(raw.float()) for raw in raws]
            seqs.append(encode_dialogue(json.loads(text), latents, tok))
    return seqs


def user_audio(seq):
    """(L,) bool: the positions of audio the user supplied (an encode_dialogue dict's spans that
    are conditioning, not the assistant's diffusion targets)."""
    span = seq["span_id"]
    return (span >= 0) & ~seq["span_is_target"][span.clamp(min=0)]


def text_only(seq):
    """Stage 1 of the curriculum: a dialogue (encode_dialogue dict) with its audio spans cut out;
    the <|audio|> and <|/audio|> markers stay, so the turns keep their shape. The answer about a
    user-supplied clip is not learned here: without the clip it could only be guessed.

    Why a text stage: writing a plan means copying from the context (the request's voices and
    words; the previous plan, nearly verbatim, in an edit), and a small transformer learns to copy
    only after seeing some thousands of dialogues. Audio is ~70% of a dialogue's tokens, so on
    text alone the same compute shows the model ~3x more dialogues; the joint stage then learns
    the audio on top (the paper, too, trains in stages)."""
    is_audio = seq["span_id"] >= 0
    text_target = seq["text_target"].clone()
    heard = user_audio(seq)
    if heard.any():   # the user's clip comes last (simulate_data.make_dialogue): mask from there on
        text_target[int(heard.nonzero()[0]):] = False
    keep = ~is_audio
    return {"tokens": seq["tokens"][keep], "audio": seq["audio"][keep], "span_id": seq["span_id"][keep],
            "span_is_target": seq["span_is_target"][:0], "text_target": text_target[keep],
            "is_plain_text": seq["is_plain_text"][keep]}


def pack(seqs, block_size, seed):
    """First-fit packing of whole dialogues into rows of at most block_size tokens -> list of rows,
    each a list of indices into seqs. Dialogues never split: a row's doc_id keeps them apart in
    attention (see model.transfusion_mask)."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    fits = [i for i in order if len(seqs[i]["tokens"]) <= block_size]
    if len(fits) < len(order):
        print(f"note: {len(order) - len(fits)} of {len(seqs)} dialogues are longer than block_size={block_size} and are left out")
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


def get_batch(seqs, rows, batch_size, generator, pad_id, device):
    """Draw batch_size packed rows with `generator` and collate them to padded (B, L) tensors."""
    picks = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
    batch = collate([[seqs[i] for i in rows[r]] for r in picks], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def ensure_dataset(config):
    """Simulate a dataset into config.data_dir if it holds none (rank 0 only; the others wait).
    One that is there is used as it is, with a note if it is smaller than n_dialogues or n_listen asks."""
    if config.n_dialogues < 1 or config.n_listen < 0:
        sys.exit(f"error: --n_dialogues must be >= 1 and --n_listen >= 0, got {config.n_dialogues} and {config.n_listen}")
    meta_path = os.path.join(config.data_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            counts = json.load(f)["counts"]
        for split, asked in (("train", config.n_dialogues), ("listen", config.n_listen)):   # more is used as it is
            if counts.get(split, 0) < asked:
                print(f"note: {config.data_dir!r} holds {counts.get(split, 0)} {split} dialogues, fewer than the {asked} "
                      f"this run asks for; training on them (a new --data_dir simulates {asked})")
        return
    import simulate_data
    listening = f" and {config.n_listen} listening dialogues" if config.n_listen else ""
    print(f"no dataset in {config.data_dir!r}: simulating {config.n_dialogues} dialogues{listening} first")
    simulate_data.write_dataset(config.data_dir, n=config.n_dialogues, n_listen=config.n_listen)


# -----------------------------------------------------------------------------
# checkpoints: atomic writes, one format read by sample.py and eval.py

def save_checkpoint(path, model, optimizer, model_config, config, tok, codec, iter_num, best_val):
    ckpt = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": asdict(model_config),
        "config": asdict(config),
        "tokenizer": tok.state_dict(),
        "codec": codec.state_dict(),
        "iter_num": iter_num,
        "best_val": best_val,
    }
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, device="cpu"):
    """-> (model, tok, codec, ckpt). A missing or corrupt file is one clear error, never a traceback."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path!r} (train one with: python train.py --out_dir={os.path.dirname(path) or '.'})")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        # a checkpoint written before --positions existed was trained with the position table
        model = AudioChatModel(ModelConfig(**{"positions": "learned", **ckpt["model_args"]}))
        model.load_state_dict(ckpt["model"])
        tok = BPETokenizer.from_state_dict(ckpt["tokenizer"])
        codec = AudioCodec.from_state_dict(ckpt["codec"])
    except Exception as e:
        raise SystemExit(f"error: {path!r} is not a readable AudioChat-mini checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return model.to(device).eval(), tok, codec, ckpt


# -----------------------------------------------------------------------------
# logging: log.csv and loss.png

LOG_FIELDS = ["iter", "lr", "loss", "ce", "mse", "val_loss", "val_ce", "val_mse", "elapsed_s"]


def log_row(row):
    """A step's dict -> its log.csv row: every LOG_FIELDS key, "" where the step has no value."""
    return {k: row.get(k, "") for k in LOG_FIELDS}


def plot_losses(log_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in [(axes[0], "ce", "text cross-entropy"), (axes[1], "mse", "audio v-MSE")]:
        it = [int(r["iter"]) for r in rows if r[key]]
        ax.plot(it, [float(r[key]) for r in rows if r[key]], label="train", lw=1)
        vit = [int(r["iter"]) for r in rows if r["val_" + key]]
        ax.plot(vit, [float(r["val_" + key]) for r in rows if r["val_" + key]], "o-", label="val")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def step_generator(seed, step, rank):
    """The random source of one training step: a pure function of (seed, step, rank), so a resumed
    run draws exactly the batches and noise an uninterrupted run would have drawn."""
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

def autocast_for(device):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU and MPS train in float32)."""
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
            else torch.autocast("cpu", enabled=False))


@torch.no_grad()
def validate(model, seqs, rows, config, tok, device, autocast):
    """Mean (loss, ce, mse) over config.eval_iters fixed validation batches (no CFG dropout)."""
    model.eval()
    totals = torch.zeros(3)
    for k in range(config.eval_iters):
        g = step_generator(config.seed + 1, k, 0)  # the same batches at every validation
        batch = get_batch(seqs, rows, config.batch_size, g, tok.special("<|pad|>"), device)
        with autocast:
            losses = transfusion_forcing_loss(model, batch, lambda_audio=config.lambda_audio,
                                              null_id=tok.special("<|null|>"), cfg_drop_p=0.0,
                                              per_frame=config.per_frame_noise, noise_shift=config.noise_shift, generator=g)
        totals += torch.tensor([float(x) for x in losses])
    model.train()
    return (totals / config.eval_iters).tolist()


def train(config):
    """Run training as config says; returns the list of log rows (dicts, one per step)."""
    from tqdm import tqdm
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = 0
    device = pick_device(config.device)
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
        os.makedirs(config.out_dir, exist_ok=True)
        ensure_dataset(config)
    if ddp:
        dist.barrier()

    with open(os.path.join(config.data_dir, "meta.json")) as f:
        meta = json.load(f)
    tok = BPETokenizer.load(os.path.join(config.data_dir, "tokenizer.json"))
    codec = AudioCodec.from_state_dict(meta["codec"])
    train_seqs = load_dataset(config.data_dir, "train", tok, codec)
    train_seqs += load_dataset(config.data_dir, "listen", tok, codec, required=False)
    val_seqs = load_dataset(config.data_dir, "val", tok, codec)
    train_rows = pack(train_seqs, config.block_size, config.seed)
    val_rows = pack(val_seqs, config.block_size, config.seed)
    model_config = ModelConfig(vocab_size=tok.vocab_size, latent_dim=train_seqs[0]["audio"].shape[-1],
                               n_layer=config.n_layer, n_gen_layer=config.n_gen_layer, n_head=config.n_head,
                               n_embd=config.n_embd, block_size=config.block_size, dropout=config.dropout,
                               arch=config.arch, attn=config.attn, token_shift=config.token_shift,
                               positions=config.positions)
    model = AudioChatModel(model_config).to(device)
    optimizer = model.configure_optimizers(config.weight_decay, config.learning_rate, (0.9, 0.95), device.split(":")[0])
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    log_path = os.path.join(config.out_dir, "log.csv")
    iter_num, best_val, log_rows = 0, float("inf"), []
    if config.init_from == "resume":
        model_, tok_, codec_, ckpt = load_checkpoint(ckpt_path, device)
        if ckpt["model_args"] != asdict(model_config):
            raise SystemExit(f"error: {ckpt_path} was trained with other model flags: {ckpt['model_args']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = ckpt["iter_num"], ckpt["best_val"]
        if os.path.exists(log_path):
            with open(log_path) as f:  # keep the log consistent with the checkpoint we resume from
                log_rows = [r for r in csv.DictReader(f) if int(r["iter"]) < iter_num]
        del model_, ckpt
    elif config.init_from != "scratch":
        raise SystemExit(f"error: --init_from must be scratch or resume, got {config.init_from!r}")

    text_seqs, text_rows = [], []
    if iter_num < config.text_iters:  # a run resumed past the text stage never needs its rows
        text_seqs = [t for t in map(text_only, train_seqs) if t["text_target"].any()]  # listening dialogues: nothing
        text_rows = pack(text_seqs, config.block_size, config.seed)

    n_params = sum(p.numel() for p in model.parameters())
    if master:
        print(f"{config.arch} model: {n_params / 1e6:.2f}M parameters on {device}; "
              f"{len(train_seqs)} train dialogues packed in {len(train_rows)} rows of <= {config.block_size} tokens")
    raw_model = model
    if config.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        # find_unused_parameters: a batch with no audio to learn (the text stage) leaves the
        # generation layers and the diffusion head out of the graph (model.forward's layers="text")
        model = DistributedDataParallel(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None,
                                        find_unused_parameters=True)
    autocast = autocast_for(device)

    def checkpoint(it, validation_row):
        save_checkpoint(ckpt_path, raw_model, optimizer, model_config, config, tok, codec, it, best_val)
        with open(log_path, "w", newline="") as f:  # with this step's validation, before its training
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(log_rows + [log_row(validation_row)])
        plot_losses(log_path, os.path.join(config.out_dir, "loss.png"))

    t0 = time.time() - (float(log_rows[-1]["elapsed_s"]) if log_rows else 0.0)
    bar = tqdm(range(iter_num, config.max_iters), initial=iter_num, total=config.max_iters,
               disable=not master, desc="train", dynamic_ncols=True)
    for it in bar:
        row = {"iter": it}
        if it % config.eval_interval == 0 and master:
            row["val_loss"], row["val_ce"], row["val_mse"] = validate(raw_model, val_seqs, val_rows, config, tok, device, autocast)
            best_val = min(best_val, row["val_loss"])
            if it > iter_num or (it == 0 and not log_rows):
                checkpoint(it, row)
        lr = learning_rate(config, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        g = step_generator(config.seed, it, rank)
        stage = (text_seqs, text_rows) if it < config.text_iters else (train_seqs, train_rows)
        batch = get_batch(*stage, config.batch_size, g, tok.special("<|pad|>"), device)
        with autocast:
            loss, ce, mse = transfusion_forcing_loss(model, batch, lambda_audio=config.lambda_audio,
                                                     null_id=tok.special("<|null|>"), cfg_drop_p=config.cfg_drop_p,
                                                     per_frame=config.per_frame_noise, noise_shift=config.noise_shift, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss, ce, mse = loss.detach(), ce.detach(), mse.detach()
        row.update(lr=lr, loss=loss.item(), ce=ce.item(), mse=mse.item(), elapsed_s=round(time.time() - t0, 2))
        log_rows.append(log_row(row))
        if it % config.log_interval == 0:
            bar.set_postfix(ce=f"{float(ce):.3f}", mse=f"{float(mse):.3f}", lr=f"{lr:.1e}")
    if master:
        row = {"iter": config.max_iters, "elapsed_s": round(time.time() - t0, 2)}
        row["val_loss"], row["val_ce"], row["val_mse"] = validate(raw_model, val_seqs, val_rows, config, tok, device, autocast)
        best_val = min(best_val, row["val_loss"])
        checkpoint(config.max_iters, row)
        log_rows.append(log_row(row))
        print(f"done: val ce {row['val_ce']:.3f}, val mse {row['val_mse']:.3f}; wrote {ckpt_path}, {log_path}, loss.png")
    if ddp:
        dist.destroy_process_group()
    return log_rows


if __name__ == "__main__":
    train(parse_config(TrainConfig, sys.argv[1:], PRESETS))
