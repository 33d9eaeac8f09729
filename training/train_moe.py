"""Train a small Qwen3-MoE language model on Python source code and export it to GGUF.

    python training/train_moe.py --out models/llamahot-code-moe.gguf [--minutes 10] [--device auto]

The model is llama.cpp's `qwen3moe` architecture written out in torch (RMSNorm, GQA attention with
per-head q/k RMSNorm and NEOX RoPE, softmax router, top-k experts with renormalised weights, SiLU
gated experts, tied output), so the GGUF it writes runs unchanged in stock llama-cpp-python.
Data: the `.py` files of the running Python's standard library (on every machine, offline), minus
the held-out modules in HELD_OUT (`benchmarks/data/heldout_code.txt` is made of them). Tokenizer:
byte-level BPE learned from the same files with Qwen2's pre-tokenizer (`tokenizers`), exported as
llama.cpp's "gpt2" vocabulary with pre-tokenizer "qwen2". Needs torch, tokenizers and gguf
(`pip install -e '.[train]'`). Training runs for a wall-clock budget (`--minutes`), the learning
rate schedule follows the elapsed fraction of it, so the same script fits any machine.

After export the script checks the file with llama.cpp (training/check_gguf.py, in a process of its
own): its tokenizer gives the same ids as the trained one, its logits agree with torch's, and its
held-out bits per byte.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from torch import nn

# ChatML, as llamahot.synth.CHAT_TEMPLATE (tests/test_trained_model.py compares them). Not imported:
# importing llamahot loads llama_cpp, which must not share a process with torch (check_gguf.py).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Modules kept out of training; benchmarks/data/heldout_code.txt is their text, in this order.
HELD_OUT = ("textwrap.py", "fractions.py", "heapq.py", "shlex.py")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2 uses the same expression).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclasses.dataclass(frozen=True)
class Config:
    n_vocab: int = 4096
    n_embd: int = 256
    n_layer: int = 6
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_expert: int = 32
    n_expert_used: int = 4
    n_ff_exp: int = 64
    rope_base: float = 10_000.0
    rms_eps: float = 1e-6
    context_length: int = 2048


# ---------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------

# Installed packages, and folders of generated tables (codec maps, pydoc's topic strings) that
# would teach hex tables rather than code.
SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "pydoc_data"}


def corpus_files(root: Path) -> list[Path]:
    """The standard library's Python files, sorted, without SKIP_DIRS and the held-out modules."""
    files = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts) or (path.parent == root and path.name in HELD_OUT):
            continue
        if path.stat().st_size <= 400_000:          # skip generated tables
            files.append(path)
    return files


def read_texts(files: list[Path]) -> list[str]:
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # llama-cpp-python detokenizes a token through a 32-byte buffer: keep pieces short.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=16, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    """All texts as one stream of ids, each file followed by <|endoftext|>."""
    eot = tok.token_to_id(SPECIAL_TOKENS[0])
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Model: llama.cpp's qwen3moe graph (src/models/qwen3moe.cpp) in torch
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NEOX RoPE: dimension i pairs with i + head_dim/2. x: [B, T, H, D]; cos/sin: [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        d, hd = cfg.n_embd, cfg.head_dim
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.wq = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_head_kv * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_eps)
        self.ffn_norm = RMSNorm(d, cfg.rms_eps)
        self.router = nn.Linear(d, cfg.n_expert, bias=False)
        e, ff = cfg.n_expert, cfg.n_ff_exp
        self.gate = nn.Parameter(torch.empty(e, ff, d))
        self.up = nn.Parameter(torch.empty(e, ff, d))
        self.down = nn.Parameter(torch.empty(e, d, ff))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cfg = self.cfg
        b, t, d = h.shape
        x = self.attn_norm(h)
        q = rope_neox(self.q_norm(self.wq(x).view(b, t, cfg.n_head, cfg.head_dim)), cos, sin)
        k = rope_neox(self.k_norm(self.wk(x).view(b, t, cfg.n_head_kv, cfg.head_dim)), cos, sin)
        v = self.wv(x).view(b, t, cfg.n_head_kv, cfg.head_dim)
        rep = cfg.n_head // cfg.n_head_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        h = h + self.wo(attn.transpose(1, 2).reshape(b, t, -1))
        moe, probs, chosen = self.moe(self.ffn_norm(h).view(b * t, d))
        return h + moe.view(b, t, d), probs, chosen

    def moe(self, x: torch.Tensor):
        """Softmax router, top-k, weights renormalised to 1 (qwen3moe: norm_w = true)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.cfg.n_expert_used, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = order // self.cfg.n_expert_used                 # token of each (token, k) entry, by expert
        counts = torch.bincount(flat, minlength=self.cfg.n_expert).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = rows[start:start + n]
            xe = x[idx]
            y = (F.silu(xe @ self.gate[e].T) * (xe @ self.up[e].T)) @ self.down[e].T
            out.index_add_(0, idx, y * weights.reshape(-1)[order[start:start + n]].unsqueeze(1))
            start += n
        return out, probs, chosen


class MoELM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.n_vocab, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.out_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        half = cfg.head_dim // 2
        self.register_buffer("inv_freq", cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / cfg.head_dim),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std, residual_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            nn.init.normal_(p, std=residual_std if name.endswith(("wo.weight", "down")) else std)

    def forward(self, ids: torch.Tensor):
        t = ids.shape[1]
        angles = torch.arange(t, dtype=torch.float64, device=ids.device)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()
        h = self.embed(ids)
        routing = []
        for block in self.blocks:
            h, probs, chosen = block(h, cos, sin)
            routing.append((probs, chosen))
        return self.out_norm(h) @ self.embed.weight.T, routing


def balance_loss(routing, n_expert: int) -> torch.Tensor:
    """Switch-style load-balancing term (1.0 when routing is uniform), averaged over layers."""
    total = 0.0
    for probs, chosen in routing:
        share = torch.bincount(chosen.reshape(-1), minlength=n_expert).float() / chosen.numel()
        total = total + n_expert * (share * probs.mean(0)).sum()
    return total / len(routing)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator, device):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        window = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)
        tensor = torch.from_numpy(window).to(device)
        yield tensor[:, :-1], tensor[:, 1:]


@torch.no_grad()
def evaluate(model: MoELM, data: np.ndarray, seq: int, device, max_windows: int = 32) -> float:
    model.eval()
    losses = []
    for start in range(0, min(len(data) - seq - 1, max_windows * seq), seq):
        window = torch.from_numpy(data[start:start + seq + 1].astype(np.int64)).to(device)[None]
        logits, _ = model(window[:, :-1])
        losses.append(F.cross_entropy(logits[0], window[0, 1:]).item())
    model.train()
    return float(np.mean(losses))


def train(model: MoELM, data: np.ndarray, heldout: np.ndarray, args, device) -> dict:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=False)
    stream = batches(data, args.batch, args.seq, np.random.default_rng(args.seed), device)
    budget = args.minutes * 60
    start = time.monotonic()
    step, tokens, log = 0, 0, []
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(stream)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, routing = model(x)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
        aux = balance_loss(routing, model.cfg.n_expert)
        loss = ce + args.balance * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % args.log_every == 0 or step == 1:
            entry = {"step": step, "tokens": tokens, "seconds": round(time.monotonic() - start, 1),
                     "lr": lr, "loss": round(ce.item(), 4), "balance": round(aux.item(), 4)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    result = {"steps": step, "tokens": tokens, "seconds": round(time.monotonic() - start, 1),
              "train_loss": log[-1]["loss"] if log else None,
              "heldout_loss": round(evaluate(model, heldout, args.seq, device), 4)}
    print(json.dumps(result), flush=True)
    return {"log": log, **result}


# ---------------------------------------------------------------------------------------------
# GGUF export (names and layout: llama.cpp's qwen3moe; Q8_0 matrices, F32 norms and router)
# ---------------------------------------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def export_gguf(model: MoELM, tok, path: Path, name: str) -> None:
    cfg = model.cfg
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_string("general.name", name)
    w.add_string("general.license", "PSF-2.0")
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    arch = {
        "context_length": cfg.context_length, "embedding_length": cfg.n_embd, "block_count": cfg.n_layer,
        "feed_forward_length": cfg.n_ff_exp * cfg.n_expert_used, "attention.head_count": cfg.n_head,
        "attention.head_count_kv": cfg.n_head_kv, "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim, "expert_count": cfg.n_expert,
        "expert_used_count": cfg.n_expert_used, "expert_feed_forward_length": cfg.n_ff_exp,
    }
    for key, value in arch.items():
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", cfg.rms_eps)
    w.add_float32("qwen3moe.rope.freq_base", cfg.rope_base)

    vocab = json.loads(tok.to_str())["model"]
    tokens = [None] * tok.get_vocab_size()
    for piece, index in vocab["vocab"].items():
        tokens[index] = piece
    for special in SPECIAL_TOKENS:
        tokens[tok.token_to_id(special)] = special
    assert all(t is not None for t in tokens) and len(tokens) == cfg.n_vocab
    merges = [m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot, im_end = tok.token_to_id(SPECIAL_TOKENS[0]), tok.token_to_id(SPECIAL_TOKENS[2])
    w.add_bos_token_id(eot)
    w.add_eos_token_id(eot)
    w.add_eot_token_id(im_end)
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def q8(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, gguf.quants.quantize(_np(t), QType.Q8_0), raw_dtype=QType.Q8_0)

    def f32(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, _np(t).astype(np.float32))

    q8("token_embd.weight", model.embed.weight)          # also the output matrix (tied)
    for il, b in enumerate(model.blocks):
        p = f"blk.{il}"
        f32(f"{p}.attn_norm.weight", b.attn_norm.weight)
        q8(f"{p}.attn_q.weight", b.wq.weight)
        q8(f"{p}.attn_k.weight", b.wk.weight)
        q8(f"{p}.attn_v.weight", b.wv.weight)
        q8(f"{p}.attn_output.weight", b.wo.weight)
        f32(f"{p}.attn_q_norm.weight", b.q_norm.weight)
        f32(f"{p}.attn_k_norm.weight", b.k_norm.weight)
        f32(f"{p}.ffn_norm.weight", b.ffn_norm.weight)
        f32(f"{p}.ffn_gate_inp.weight", b.router.weight)
        q8(f"{p}.ffn_gate_exps.weight", b.gate)
        q8(f"{p}.ffn_up_exps.weight", b.up)
        q8(f"{p}.ffn_down_exps.weight", b.down)
    f32("output_norm.weight", model.out_norm.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_with_llama_cpp(model: MoELM, tok, path: Path, text: str, heldout: Path) -> dict:
    """The exported file in stock llama.cpp (training/check_gguf.py, in a process without torch): the
    same token ids as the trained tokenizer, logits close to torch's, held-out bits per byte."""
    ids = tok.encode(text).ids
    prompt = ids[:256]
    with torch.no_grad():
        ref, _ = model.cpu().float()(torch.tensor([prompt]))
    reference = path.with_suffix(".reference.npz")
    np.savez(reference, ids=np.array(ids, dtype=np.int64), n_chars=len(text), logits=ref[0].numpy())
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("check_gguf.py")), str(path),
                           "--reference", str(reference), "--heldout", str(heldout)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training/check_gguf.py failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/llamahot-code-moe.gguf"))
    parser.add_argument("--data", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="folder of .py files (default: this Python's standard library)")
    parser.add_argument("--heldout", type=Path, default=Path("benchmarks/data/heldout_code.txt"))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--balance", type=float, default=3e-3, help="weight of the load-balancing loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from a checkpoint this script saved (.pt: weights and tokenizer)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cfg = Config()
    t0 = time.monotonic()
    files = corpus_files(args.data)
    texts = read_texts(files)
    if not texts:
        sys.exit(f"no .py files under {args.data}; pass --data with a folder of Python sources")
    checkpoint = torch.load(args.resume, weights_only=True) if args.resume else None
    if checkpoint:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(checkpoint["tokenizer"])
    else:
        tok = train_tokenizer(texts, cfg.n_vocab)
    data = encode(tok, texts)
    heldout_text = args.heldout.read_text()
    heldout = encode(tok, [heldout_text])
    print(json.dumps({"files": len(texts), "bytes": sum(map(len, texts)), "tokens": int(len(data)),
                      "heldout_tokens": int(len(heldout)), "prep_seconds": round(time.monotonic() - t0, 1),
                      "device": str(device), "threads": torch.get_num_threads()}), flush=True)

    model = MoELM(cfg)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    model = model.to(device)
    result = train(model, data, heldout, args, device)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().float().eval()
    export_gguf(model, tok, args.out, args.out.stem)
    summary = {"resumed_from": str(args.resume) if args.resume else None, "config": dataclasses.asdict(cfg), "args": {k: str(v) for k, v in vars(args).items()},
               "python": sys.version.split()[0], "torch": torch.__version__, "corpus_files": len(texts),
               "corpus_tokens": int(len(data)), "file_bytes": args.out.stat().st_size, **result, "check": None}
    # Summary and checkpoint before the check: whatever happens there, the training is kept.
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    torch.save({"config": dataclasses.asdict(cfg), "model": model.state_dict(), "tokenizer": tok.to_str()},
               args.out.with_suffix(".pt"))
    check = summary["check"] = check_with_llama_cpp(model, tok, args.out, heldout_text[:6000], args.heldout)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({"out": str(args.out), "MiB": round(args.out.stat().st_size / 2**20, 2), **check}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
