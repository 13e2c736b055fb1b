"""Train kimi-nano: a miniature Kimi (same architecture, format and chat template) from scratch on CPU.

    python -m weights_tools.train_nano OUT [--steps 2400] [--batch 16] [--lr 3e-3] [--seed 0] [--threads 1]
                                           [--average-last 0.1] [--optimizer muonclip|adamw] [--tau 100]
                                           [--no-qk-clip] [--toy] [--force]

The model is the real K2.5 config shrunk in size only (MLA with YaRN RoPE, sigmoid ``noaux_tc`` router
with ``e_score_correction_bias``, a shared expert, the first layer dense), trained on the generated
conversations of :mod:`weights_tools.nano_data` (loss on assistant tokens only), with:

* MuonClip (:mod:`kimi_ref.muonclip`): Muon for the matrices, AdamW for the rest, and QK-Clip after
  every step, fed by each attention's per-head maximum logit (``MLA.track_max_logit``);
* aux-loss-free balancing: after each step every MoE layer nudges ``e_score_correction_bias`` of its
  overloaded experts down and of its idle ones up by ``BIAS_RATE`` (DeepSeek-V3, used by Kimi K2);
* a tail average: the weights written are the mean of the weights after each of the last
  ``--average-last`` × steps updates (:class:`TailAverage`), not the last update's alone.

Training runs in fp32 with dense experts; the result is written in the real checkpoint layout
(:func:`weights_tools.make_tiny.write_checkpoint`): routed experts quantized to INT4 (compressed-tensors
pack-quantized), everything else bf16, the demo tokenizer, plus ``train_log.json`` (loss and per-head
max logits per step), ``dense_experts.safetensors`` (the bf16 experts before quantization)
and ``tools.json`` (the tools it was trained with), all renamed into place at once when training is done
(``OUT`` is checked before training starts: it must be new or empty, or ``--force`` replaces the
checkpoint there as a whole; :mod:`weights_tools.safe_write`). The same seed gives the same weights: data, initialisation and the
update order are all seeded. Floating-point sums depend on the thread count, so
a run reproduces bit for bit with the same ``--threads``; the default, 1, is how the shipped kimi-nano
was made (kimi_ref/data/nano/README.md has its CPU time: under the 60 minutes of one core it is sized for).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kimi_ref.config import KimiConfig, fixture_path, load_config, tiny_config
from kimi_ref.model import KimiForCausalLM
from kimi_ref.tokenizer import Tokenizer
from weights_tools import nano_data
from weights_tools._cli import FAILURE, INTERRUPTED, USAGE, fail
from weights_tools.safe_write import OutputError, check_dir

__all__ = ["nano_config", "build_model", "train", "TailAverage", "checkpoint_tensors", "main", "BIAS_RATE"]

BIAS_RATE = 1e-3  # DeepSeek-V3's bias update speed γ
DENSE_EXPERTS_FILE = "dense_experts.safetensors"


def nano_config(*, toy: bool = False) -> KimiConfig:
    """K2.5's config, shrunk: d 128, 4 layers (1 dense), 4 heads, 8 experts top-2 + 1 shared, vocab 4096."""
    real = load_config(fixture_path("kimi_k25"))
    if toy:  # for CI: the smallest model that exercises every part
        return tiny_config(real, vocab_size=4096)
    # The latent (kv_lora_rank) and value widths are generous for d = 128: copying a number from the
    # question into the answer moves the token's identity through the latent and a head's value.
    return tiny_config(real, vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       q_lora_rank=96, kv_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       intermediate_size=256, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2)


def build_model(config: KimiConfig, seed: int) -> KimiForCausalLM:
    """The fp32 training model: dense experts (quantized only when saved), every MLA tracking max logits."""
    torch.manual_seed(seed)
    model = KimiForCausalLM(config.replace(quantization=None), dtype=torch.float32, mla_mode="naive")
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02 if "embed" in name or "lm_head" in name else p.shape[1] ** -0.5)
        elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            torch.nn.init.ones_(p)
    for layer in model.model.layers:
        layer.self_attn.track_max_logit = True
    return model


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, (seq, m) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


def loss_fn(model: KimiForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant's tokens (right padding never enters a loss)."""
    hidden = model.model(ids[:, :-1])
    target = mask[:, 1:]
    # lm_head only where a loss is taken: most positions are the prompt, the tool declaration or padding
    return F.cross_entropy(model.logits(hidden[target]), ids[:, 1:][target])


class _LoadCounter:
    """Counts how many tokens each expert received in the last forward of every MoE layer."""

    def __init__(self, model: KimiForCausalLM):
        self.counts: dict[int, torch.Tensor] = {}
        self.gates = {}
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                self.gates[i] = gate
                gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            _, ids = output
            self.counts[i] = torch.bincount(ids.flatten(), minlength=module.weight.shape[0])
        return hook

    @torch.no_grad()
    def balance(self, rate: float) -> None:
        for i, gate in self.gates.items():
            load = self.counts[i].float()
            gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)


def _max_logits(model: KimiForCausalLM) -> list[list[float]]:
    return [layer.self_attn.max_logit.tolist() for layer in model.model.layers]


# Weight decay per step is lr · WEIGHT_DECAY. Kimi's 0.1 goes with a learning rate around 2e-4 (a shrink
# of 2e-5 per step); our learning rate is 15 times larger, so a smaller λ keeps the shrink per step alike.
WEIGHT_DECAY = 0.01


class TailAverage:
    """The mean of the model's weights after each of the last ``count`` of ``steps`` updates.

        w̄ = (1/N) Σ_{s = steps-N}^{steps-1} w_s        (every float tensor of the state dict, buffers too)

    Each update at the end of training still moves the weights by lr × (noise of one batch of 16); the
    mean over N updates keeps what they agree on. The sum is kept in float64, so that N additions do not
    round the mean.
    """

    def __init__(self, model: KimiForCausalLM, steps: int, count: int):
        if not 1 <= count <= steps:
            raise ValueError(f"the tail average needs 1 to {steps} updates (the whole run), found {count}")
        self.first, self.count, self.added = steps - count, count, 0
        self.sums = {k: torch.zeros_like(v, dtype=torch.float64)
                     for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def add(self, step: int, model: KimiForCausalLM) -> None:
        if step < self.first:
            return
        for k, v in model.state_dict().items():
            if k in self.sums:
                self.sums[k] += v
        self.added += 1

    @torch.no_grad()
    def load_into(self, model: KimiForCausalLM) -> None:
        if self.added != self.count:
            raise RuntimeError(f"the tail average saw {self.added} of its {self.count} updates")
        state = model.state_dict()
        model.load_state_dict({k: (self.sums[k] / self.count).to(v.dtype) if k in self.sums else v
                               for k, v in state.items()})


def tail_count(steps: int, fraction: float) -> int:
    """How many final updates ``--average-last`` averages: a fraction of the steps, at least the last one."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"--average-last (average_last) must be a fraction of the steps from 0 to 1, found {fraction}")
    return max(1, round(steps * fraction))


def make_optimizer(model: KimiForCausalLM, kind: str, lr: float, tau: float | None):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    if kind == "muonclip":
        from kimi_ref.muonclip import MuonClip

        return MuonClip(model, lr=lr, weight_decay=WEIGHT_DECAY, tau=tau, config=model.config)
    raise ValueError(f"--optimizer must be 'muonclip' or 'adamw', found {kind!r}")


def train(config: KimiConfig, *, steps: int, batch_size: int, seed: int = 0, optimizer: str = "muonclip",
          lr: float = 3e-3, tau: float | None = 100.0, log_every: int = 10, progress=print,
          tokenizer: Tokenizer | None = None, after_step=None, lr_floor: float = 0.1,
          average_last: float = 0.1) -> tuple[KimiForCausalLM, dict]:
    """Train from scratch; returns the fp32 model and the log {step, loss, max_logit[layer][head], ...}.

    ``tokenizer`` defaults to the demo one (the vocabulary the checkpoint ships with);
    ``after_step(step, model)``, when given, runs after every update (benchmarks measure along the way;
    it sees each update's own weights, never the average).
    The learning rate warms up over the first 5% of steps, then falls along a cosine to ``lr_floor`` × lr.
    ``average_last`` > 0 returns the :class:`TailAverage` of that fraction of the last updates (0: the last
    update's weights). The defaults are the CLI's, which made the shipped kimi-nano.
    """
    tok = Tokenizer.demo() if tokenizer is None else tokenizer
    model = build_model(config, seed)
    opt = make_optimizer(model, optimizer, lr, tau)
    counter = _LoadCounter(model)
    warmup = max(1, steps // 20)

    def lr_factor(s: int) -> float:  # times lr at step s: a linear warm-up, then a cosine from 1 to lr_floor
        cosine = 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
        return min(1.0, (s + 1) / warmup) * (lr_floor + (1 - lr_floor) * cosine)

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    tail = TailAverage(model, steps, tail_count(steps, average_last)) if average_last else None
    log = {"config": {"optimizer": optimizer, "tau": tau, "lr": lr, "lr_floor": lr_floor, "steps": steps,
                      "batch": batch_size, "seed": seed, "averaged_updates": tail.count if tail else 1},
           "step": [], "loss": [], "max_logit": [], "seconds": [], "cpu_seconds": []}
    start, cpu_start = time.perf_counter(), time.process_time()
    for step, batch in enumerate(nano_data.batches(tok, batch_size, steps, seed=seed)):
        ids, mask = _pad(batch, config.pad_token_id)
        loss = loss_fn(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # MuonClip applies QK-Clip here, from the max logits of this forward
        schedule.step()
        counter.balance(BIAS_RATE)
        if tail is not None:
            tail.add(step, model)
        if step % log_every == 0 or step == steps - 1:
            log["step"].append(step)
            log["loss"].append(round(loss.item(), 5))
            log["max_logit"].append([[round(v, 3) for v in heads] for heads in _max_logits(model)])
            log["seconds"].append(round(time.perf_counter() - start, 1))
            log["cpu_seconds"].append(round(time.process_time() - cpu_start, 1))  # this process's CPU time
            progress(f"step {step:5d}  loss {loss.item():.4f}  max logit "
                     f"{max(max(h) for h in log['max_logit'][-1]):7.2f}  {log['seconds'][-1]:7.1f} s "
                     f"({log['cpu_seconds'][-1]:.1f} s CPU)")
        if after_step is not None:  # after the log: a forward here overwrites the tracked max logits
            after_step(step, model)
    if tail is not None:
        tail.load_into(model)
    return model, log


def checkpoint_tensors(model: KimiForCausalLM, config: KimiConfig) -> dict[str, torch.Tensor]:
    """The trained fp32 model as checkpoint tensors: INT4 where ``config.quantization`` says, bf16 elsewhere."""
    from weights_tools.make_tiny import checkpoint_tensors as stored

    state = model.state_dict()

    def dense(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{key}: trained tensor has shape {tuple(state[key].shape)}, the checkpoint expects {shape}")
        return state[key]

    return stored(config, dense)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m weights_tools.train_nano", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output checkpoint directory (created; must be empty unless --force)")
    parser.add_argument("--force", action="store_true", help="replace the checkpoint in OUT as a whole")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    # 3e-3: at 1e-2 the logits of every layer sat at τ (QK-Clip working all the time) and the loss fell later
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", default="muonclip", choices=["muonclip", "adamw"])
    parser.add_argument("--tau", type=float, default=100.0, help="QK-Clip threshold on the max attention logit")
    parser.add_argument("--no-qk-clip", action="store_true", help="MuonClip without the clip (for comparison)")
    parser.add_argument("--average-last", type=float, default=0.1, metavar="FRACTION",
                        help="write the mean of the weights after each of the last FRACTION x steps updates "
                             "(0: the last update's weights)")
    parser.add_argument("--toy", action="store_true", help="the smallest model (CI smoke test)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (a run reproduces bit for bit for a given thread count; 1 made the shipped nano)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) < 1:
            return fail("train_nano", f"--{name} must be at least 1, found {getattr(args, name)}", USAGE)
    try:
        tail_count(args.steps, args.average_last)
    except ValueError as e:
        return fail("train_nano", e, USAGE)
    try:  # before half an hour of training, not after
        check_dir(args.out, force=args.force)
    except OutputError as e:
        return fail("train_nano", e, USAGE)
    torch.set_num_threads(args.threads)

    from weights_tools.make_tiny import write_checkpoint

    config = nano_config(toy=args.toy)
    try:
        model, log = train(config, steps=args.steps, batch_size=args.batch, seed=args.seed, optimizer=args.optimizer,
                           lr=args.lr, tau=None if args.no_qk_clip else args.tau, average_last=args.average_last)
    except KeyboardInterrupt:
        return fail("train_nano", f"training stopped; nothing was written to {args.out}", INTERRUPTED)
    # The bf16 originals of the INT4 experts (not part of the checkpoint format): they let a test measure
    # what quantization costs, by swapping them back in (tests/test_nano.py).
    dense = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if ".mlp.experts." in k}

    def extra(directory: Path) -> None:
        (directory / "train_log.json").write_text(json.dumps(log) + "\n")
        save_file(dense, str(directory / DENSE_EXPERTS_FILE), metadata={"format": "pt"})
        # The tools it was trained with: `python -m kimi_ref.chat` declares them when no --tools is given.
        (directory / "tools.json").write_text(json.dumps(nano_data.TOOLS, indent=2) + "\n")

    try:
        out = write_checkpoint(args.out, config, checkpoint_tensors(model, config), force=args.force, extra=extra,
                               variant=nano_data.VARIANT)  # recorded in tokenizer_config.json: what it was trained on
    except OutputError as e:
        return fail("train_nano", e, FAILURE)
    except KeyboardInterrupt:
        return fail("train_nano", f"{args.out} was left as it was", INTERRUPTED)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
