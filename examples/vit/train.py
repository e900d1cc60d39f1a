"""Train a Vision Transformer with DropGrad through Accelerate, on CPU, CUDA or MPS.

    accelerate launch examples/vit/train.py --drop_rate 0.1          # any Accelerate setup
    python examples/vit/train.py --drop_rate 0.1                     # one process

DropGrad (and clipping, restarts) are applied where they belong for the setup (DDP comm hook,
FSDP or single-process step wrapper) by ``dropgrad_dist.prepare_regularizers``. The default dataset is an embedded
synthetic one (no download); ``--dataset cifar10`` uses torchvision's CIFAR-10.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    DistributedType,
    set_seed,
)
from torch.utils.data import DataLoader
from torchvision.models import VisionTransformer
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import cifar10_splits, synthetic_splits  # noqa: E402

from dropgrad_dist import CLIPPING_METHODS, check_launch, enable_fsdp_on_cpu, prepare_regularizers  # noqa: E402
from dropgrad_dist.core.collectives import exit_skipping_finalization  # noqa: E402

OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad", "adadelta", "lion")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["synthetic", "cifar10"], default="synthetic")
    parser.add_argument("--data_dir", default="data", help="CIFAR-10 location (downloaded there if absent and online)")
    parser.add_argument("--train_size", type=int, default=20_000, help="synthetic training images")
    parser.add_argument("--test_size", type=int, default=2_000, help="synthetic test images")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: Accelerate's config / environment")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    parser.add_argument("--drop_rate", type=float, default=0.1, help="DropGrad rate p in [0, 1]; 0 disables DropGrad")
    parser.add_argument("--communication", choices=["dense", "compact"], default="dense",
                        help="DDP hook all-reduce: whole buckets or only kept coordinates")
    parser.add_argument("--comm_hook", choices=["none", "fp16", "bf16", "powersgd"], default="none",
                        help="torch's DDP compression hook (Accelerate's comm_hook); with --drop_rate > 0 DropGrad's "
                             "mask is composed with it (dense communication)")
    parser.add_argument("--powersgd_rank", type=int, default=4, help="PowerSGD's matrix_approximation_rank")
    parser.add_argument("--powersgd_start", type=int, default=10,
                        help="PowerSGD's start_powerSGD_iter: exact all-reduces before it (torch recommends ~10)")
    parser.add_argument("--dropout", type=float, default=0.0, help="classic dropout in the ViT (baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--lr", type=float, default=None, help="default depends on --optimizer")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--batch_size", type=int, default=128, help="global batch size per optimizer step")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--max_grad_norm", type=float, default=None,
                        help="accelerator.clip_grad_norm_ after unscaling (default 1.0; 0 disables); "
                             "the --clipping_type methods replace it")
    parser.add_argument("--clipping_type", choices=CLIPPING_METHODS, default=None,
                        help="dropgrad_dist.GradientClipper method (torch-clip's names), applied after DropGrad")
    parser.add_argument("--clipping_level", type=float, default=1.0, help="clipping level eta")
    parser.add_argument("--clip_beta", type=float, default=None, help="beta in (0, 1) of the random methods")
    parser.add_argument("--p_autoclip", type=float, default=0.75, help="AutoClip quantile in (0, 1]")
    parser.add_argument("--restarts", type=int, default=0,
                        help="restart from the averaged iterate after this many steps, then every "
                             "--restart_coeff times longer (0 disables)")
    parser.add_argument("--restart_coeff", type=float, default=1.25)
    parser.add_argument("--gnp_alpha", type=float, default=0.0,
                        help="gradient norm penalty weight alpha = lambda / r in [0, 1] (0 disables)")
    parser.add_argument("--gnp_r", type=float, default=0.05, help="gradient norm penalty radius r")
    parser.add_argument("--gnp_warmup", choices=["none", "lambda", "r", "zero"], default="none",
                        help="GNP warmup over --warmup_steps (the learning-rate warmup)")
    parser.add_argument("--sam_rho", type=float, default=0.0, help="SAM radius rho (= --gnp_alpha 1 --gnp_r rho)")
    parser.add_argument("--perturbation", choices=["global", "local"], default="global",
                        help="GNP/SAM first gradient: rank-averaged (global) or per replica (local, DDP)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--hidden_dim", type=int, default=128)
    parser.add_argument("--mlp_dim", type=int, default=256)
    parser.add_argument("--eval_every", type=int, default=None, help="optimizer steps between evaluations "
                        "(default: once per epoch)")
    parser.add_argument("--output_dir", default="outputs/vit")
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="save state every N optimizer steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a step_N folder, or 'latest' in --output_dir")
    parser.add_argument("--report_to", default=None, help="Accelerate trackers, e.g. tensorboard or all")
    args = parser.parse_args(argv)
    for name in ("batch_size", "epochs", "gradient_accumulation_steps", "num_layers", "num_heads",
                 "hidden_dim", "mlp_dim", "patch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0.0 <= args.drop_rate <= 1.0:
        parser.error(f"--drop_rate must be in [0, 1], got {args.drop_rate}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.comm_hook != "none" and args.communication == "compact" and args.drop_rate > 0:
        parser.error("--comm_hook composes with DropGrad's dense mask; --communication compact is its own compression")
    if args.powersgd_rank <= 0 or args.powersgd_start < 2:
        parser.error(f"--powersgd_rank must be positive and --powersgd_start >= 2 (PowerSGD's error feedback needs "
                     f"it), got {args.powersgd_rank} and {args.powersgd_start}")
    if args.clipping_type is not None and args.max_grad_norm:
        parser.error("--max_grad_norm and --clipping_type both clip: give one of them")
    if args.max_grad_norm is None:
        args.max_grad_norm = 0.0 if args.clipping_type is not None else 1.0
    if args.restarts < 0:
        parser.error(f"--restarts must be >= 0, got {args.restarts}")
    if args.sam_rho:
        if args.gnp_alpha:
            parser.error("--sam_rho is --gnp_alpha 1 --gnp_r rho: give one of them")
        args.gnp_alpha, args.gnp_r = 1.0, args.sam_rho
    if args.gnp_alpha and args.gradient_accumulation_steps > 1:
        parser.error("GNP/SAM evaluate every micro-batch twice: use --gradient_accumulation_steps 1 "
                     "(accumulate inside the closure when calling the library directly)")
    return args


def build_model(args: argparse.Namespace, image_size: int = 32) -> VisionTransformer:
    if image_size % args.patch_size:
        raise ValueError(f"--patch_size {args.patch_size} must divide the image size {image_size}")
    return VisionTransformer(image_size=image_size, patch_size=args.patch_size, num_layers=args.num_layers,
                             num_heads=args.num_heads, hidden_dim=args.hidden_dim, mlp_dim=args.mlp_dim,
                             dropout=args.dropout, attention_dropout=args.dropout, num_classes=10)


def cpu_has_bf16_instructions() -> bool:
    """Whether the CPU computes bf16 natively (x86: AVX512-BF16 or AMX; other architectures: assumed)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


_WARNED_SLOW_BF16 = False


def warn_if_slow_bf16(mixed_precision: str, device: torch.device, native: bool | None = None) -> bool:
    """Warn once per process that bf16 autocast on a CPU without bf16 instructions is slow; returns whether it did.

    Without them oneDNN emulates every bf16 matmul: the demo's ViT stepped about 7x slower than in
    fp32 (0.6 -> 4.2 s/step, one thread, AVX2 only), against 1.3x slower with AVX512-BF16.
    """
    global _WARNED_SLOW_BF16
    if _WARNED_SLOW_BF16 or mixed_precision != "bf16" or device.type != "cpu":
        return False
    if native if native is not None else cpu_has_bf16_instructions():
        return False
    _WARNED_SLOW_BF16 = True
    warnings.warn("bf16 autocast on this CPU (no AVX512-BF16 or AMX instructions) emulates bf16 and is several "
                  "times slower than fp32: drop --mixed_precision bf16 / MIXED_PRECISION=bf16 for speed",
                  stacklevel=2)
    return True


def build_optimizer(args: argparse.Namespace, params) -> torch.optim.Optimizer:
    defaults = {"adam": 1e-3, "adamw": 2e-3, "sgd": 0.05, "adagrad": 1e-2, "adadelta": 1.0, "lion": 1e-4}
    lr = args.lr if args.lr is not None else defaults[args.optimizer]
    if args.optimizer == "lion":
        from lion_pytorch import Lion
        return Lion(params, lr=lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay / 10)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "adadelta": torch.optim.Adadelta}
    return cls[args.optimizer](params, lr=lr)


def record_gradient_norm(args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module,
                         regularizers) -> dict:
    """The global gradient norm before and after clipping, for runs the GradientClipper does not log.

    With --max_grad_norm, accelerator.clip_grad_norm_ clips (masked, unscaled gradients) and returns
    the norm before; without any clipping the library computes it (all shards, all ranks).
    """
    if args.max_grad_norm > 0:
        norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        return {"grad_norm": norm, "grad_norm_clipped": min(norm, args.max_grad_norm)}
    if regularizers.clipper is not None:
        return {}  # the clipper logs both (regularizers.metrics())
    norm = regularizers.gradient_norm()
    return {"grad_norm": norm, "grad_norm_clipped": norm}


def regularizer_options(args: argparse.Namespace, total_steps: int) -> dict:
    """prepare_regularizers' keyword arguments from the command line (None: not used)."""
    return {
        "dropgrad": dict(drop_rate=args.drop_rate, seed=args.seed, communication=args.communication)
        if args.drop_rate > 0 else None,
        "clipping": dict(method=args.clipping_type, clipping_level=args.clipping_level, beta=args.clip_beta,
                         p_autoclip=args.p_autoclip, seed=args.seed) if args.clipping_type else None,
        "restarts": dict(first_restart_steps=args.restarts, restart_coeff=args.restart_coeff,
                         max_steps=max(total_steps, args.restarts)) if args.restarts else None,
        # The GNP warmup is tied to the learning-rate warmup.
        "gnp": dict(alpha=args.gnp_alpha, r=args.gnp_r, warmup=args.gnp_warmup, perturbation=args.perturbation,
                    warmup_steps=args.warmup_steps if args.gnp_warmup != "none" else 0) if args.gnp_alpha else None,
    }


def ddp_kwargs(args: argparse.Namespace) -> list[DistributedDataParallelKwargs]:
    """Accelerate's DDP settings for ``--comm_hook`` (none: Accelerate's defaults)."""
    if args.comm_hook == "none":
        return []
    hook = {"fp16": DDPCommunicationHookType.FP16, "bf16": DDPCommunicationHookType.BF16,
            "powersgd": DDPCommunicationHookType.POWER_SGD}[args.comm_hook]
    if args.comm_hook != "powersgd":
        return [DistributedDataParallelKwargs(comm_hook=hook)]
    # PowerSGD issues its second all-reduce from the first one's completion callback: under gloo that
    # races the next bucket's all-reduce (ranks disagree on the order), so one bucket holds every gradient.
    return [DistributedDataParallelKwargs(
        comm_hook=hook, bucket_cap_mb=4096 if args.cpu else 25,
        comm_state_option={"matrix_approximation_rank": args.powersgd_rank,
                           "start_powerSGD_iter": args.powersgd_start})]


def warmup_cosine(total_steps: int, warmup_steps: int, ticks_per_step: int = 1):
    """LR factor: linear warmup then cosine decay, as a function of scheduler ticks."""
    def factor(tick: int) -> float:
        step = tick // ticks_per_step
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def load_data(args: argparse.Namespace):
    if args.dataset == "synthetic":
        return synthetic_splits(args.seed, args.train_size, args.test_size)
    root = Path(args.data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        return cifar10_splits(root, download=False)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable mirror must fail, not hang, the download
    try:
        return cifar10_splits(root, download=True)
    except Exception as err:  # offline: torchvision raises URLError/OSError/RuntimeError
        raise FileNotFoundError(f"CIFAR-10 is not in --data_dir {str(root)!r} and could not be downloaded "
                                f"({type(err).__name__}); use --dataset synthetic or an existing --data_dir") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


@torch.no_grad()
def evaluate(model, loader, accelerator) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not accelerator.is_local_main_process):
        logits = model(images)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        count += labels.numel()
    model.train()
    return loss_sum / count, correct / count


def resume_step(args: argparse.Namespace) -> tuple[Path | None, int]:
    if not args.resume_from_checkpoint:
        return None, 0
    path = Path(args.resume_from_checkpoint)
    if args.resume_from_checkpoint == "latest":
        found = sorted(Path(args.output_dir).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if not found:
            raise FileNotFoundError(f"no step_N checkpoint in --output_dir {args.output_dir}")
        path = found[-1]
    match = re.fullmatch(r"step_(\d+)", path.name)
    if not path.is_dir() or not match:
        raise FileNotFoundError(f"--resume_from_checkpoint {str(path)!r} is not a step_N checkpoint folder")
    return path, int(match.group(1))


class MetricsLog:
    """Append-only JSON lines in output_dir/metrics.jsonl, written by the main process."""

    def __init__(self, path: Path, accelerator: Accelerator, resume: bool) -> None:
        self.accelerator = accelerator
        self.file = open(path, "a" if resume else "w") if accelerator.is_main_process else None

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                                 step=record.get("step"))


def _param_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        # A copy: numpy() on FSDP's own storage would pin it (FSDP2 frees it by resizing).
        digest.update(local.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
    return digest.hexdigest()[:16]


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """The whole model's state dict: Accelerate's gathering where parameters are sharded (FSDP, DeepSpeed).

    One process and DDP hold whole parameters; reading them directly keeps Accelerate's unwrapping,
    which imports DeepSpeed wherever it is installed, off runs that do not use it.
    """
    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        return inner.state_dict()
    return accelerator.get_state_dict(model)


def training_function(args: argparse.Namespace) -> dict:
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=ddp_kwargs(args),
    )
    check_launch(accelerator)  # before anything is built or written: ranks that would train as separate runs
    if accelerator.is_local_main_process:
        warn_if_slow_bf16(accelerator.mixed_precision, accelerator.device)
    if args.cpu and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.num_processes > 1:
        enable_fsdp_on_cpu(accelerator)  # Accelerate would silently use DDP on CPU instead
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, completed_steps = resume_step(args)
    if args.report_to:
        accelerator.init_trackers("vit_dropgrad", config={k: v for k, v in vars(args).items()
                                                          if isinstance(v, (int, float, str, bool))})

    train_set, test_set = load_data(args)
    per_process_batch = args.batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    if per_process_batch < 1:
        raise ValueError(f"--batch_size {args.batch_size} is smaller than processes x accumulation steps")
    # Own generators keep iterator creation (which draws a worker seed) off the global RNG, so
    # dropout draws the same numbers whether or not a run was resumed or evaluated in between.
    train_loader = DataLoader(train_set, batch_size=per_process_batch, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(test_set, batch_size=256, generator=torch.Generator().manual_seed(args.seed))
    model = build_model(args)
    optimizer = build_optimizer(args, model.parameters())
    steps_per_epoch = len(train_loader) // (accelerator.num_processes * args.gradient_accumulation_steps)
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    # AcceleratedScheduler ticks once per process per optimizer step (Accelerate's convention).
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, args.warmup_steps, ticks_per_step=accelerator.num_processes))
    model, optimizer, train_loader, test_loader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, lr_scheduler)
    regularizers = prepare_regularizers(accelerator, model, optimizer, **regularizer_options(args, total_steps))
    accelerator.print(f"regularizers: {regularizers.describe()} ({accelerator.distributed_type}, "
                      f"{accelerator.mixed_precision}, {accelerator.device})")
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at optimizer step {completed_steps}")

    log = MetricsLog(output_dir / "metrics.jsonl", accelerator, resume=checkpoint is not None)
    if checkpoint is None:
        log.write({"type": "config", "processes": accelerator.num_processes,
                   "distributed_type": str(accelerator.distributed_type), **vars(args)})
    eval_every = args.eval_every or steps_per_epoch
    start_time = time.perf_counter()
    progress = tqdm(total=total_steps, initial=completed_steps, desc="train",
                    disable=not accelerator.is_local_main_process)
    epoch = completed_steps // steps_per_epoch
    batches_done = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
    test_loss, test_acc = float("nan"), float("nan")
    while completed_steps < total_steps:
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        batches_done = 0
        correct = seen = 0
        step_start = time.perf_counter()
        for images, labels in batches:
            with accelerator.accumulate(model):
                if regularizers.gnp is not None:
                    outputs = []

                    def closure():  # evaluated at theta and at the perturbed point
                        outputs.append(model(images))
                        loss = torch.nn.functional.cross_entropy(outputs[-1], labels)
                        accelerator.backward(loss)
                        return loss

                    loss = regularizers.step(closure)
                    logits = outputs[0]
                else:
                    logits = model(images)
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        norms = record_gradient_norm(args, accelerator, model, regularizers)
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            seen += labels.numel()
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            mean_loss = accelerator.reduce(loss.detach().float(), "mean").item()
            record = {"type": "train", "step": completed_steps, "epoch": epoch, "loss": mean_loss,
                      "lr": lr_scheduler.get_last_lr()[0], "step_time": time.perf_counter() - step_start}
            record.update(regularizers.metrics())
            if regularizers.gnp is None and regularizers.clipper is None:
                record.update(norms)
            log.write(record)
            if args.checkpointing_steps and completed_steps % args.checkpointing_steps == 0:
                accelerator.save_state(str(output_dir / f"step_{completed_steps}"))
            if completed_steps % eval_every == 0 or completed_steps == total_steps:
                test_loss, test_acc = evaluate(model, test_loader, accelerator)
                train_acc = accelerator.reduce(torch.tensor([correct / max(seen, 1)], device=accelerator.device),
                                               "mean").item()
                log.write({"type": "eval", "step": completed_steps, "epoch": epoch, "train_loss": mean_loss,
                           "train_accuracy": train_acc, "test_loss": test_loss, "test_accuracy": test_acc})
                accelerator.print(f"step {completed_steps}: train loss {mean_loss:.4f} acc {train_acc:.4f} | "
                                  f"test loss {test_loss:.4f} acc {test_acc:.4f}")
                correct = seen = 0
            if completed_steps >= total_steps:
                break
            step_start = time.perf_counter()
        epoch += 1
    progress.close()
    wall_time = time.perf_counter() - start_time
    summary = {"type": "final", "step": completed_steps, "test_loss": test_loss, "test_accuracy": test_acc,
               "wall_time": wall_time, "processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device)}
    # Ranks hold identical parameters under DDP (and identical shards' owners under FSDP):
    # a digest per rank lets a reader check that every rank applied the same masks.
    summary["rank_param_digests"] = accelerator.gather_for_metrics([_param_digest(model)], use_gather_object=True)
    log.write(summary)
    accelerator.print(f"done: test accuracy {test_acc:.4f} after {completed_steps} steps in {wall_time:.1f} s")
    full_state = full_state_dict(accelerator, model)  # collective under FSDP: every rank calls it
    if accelerator.is_main_process:
        torch.save(full_state, output_dir / "model.pt")
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        training_function(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Everything is written and the process group is gone: end without interpreter finalization,
    # where a gloo worker still releasing Accelerate's last gather tensors would abort the process
    # (twice in about 20 runs of the launch tests on 2 loaded cores).
    exit_skipping_finalization(main())
