"""DropGrad, clipping and SAM/GNP inside a Hugging Face ``Trainer`` run (tiny BERT built from a config, no download).

One process, or two CPU processes (DDP, the DropGrad communication hook), or FSDP2:

    python examples/hf_trainer.py                                   # writes outputs/hf_trainer
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output_dir /tmp/hf_ddp
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output_dir /tmp/hf_fsdp2 --fsdp2
    python examples/hf_trainer.py --output_dir /tmp/hf_sam --sam 0.05 --gradient_accumulation_steps 2

``split_batches`` makes ``--batch_size`` the global batch that the processes split, so the
commands step on the same batches and end with the same parameters. ``--save_steps 2`` writes
Trainer's ``checkpoint-N/`` folders (with the regularizers' state); ``--resume_from_checkpoint
DIR`` continues one. Writes ``params.safetensors`` and ``result.json`` (the log history and the
steps DropGrad took) into ``--output_dir``.
"""

import argparse
import json
import os
from typing import Any

import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from dropgrad_dist import enable_fsdp_on_cpu
from dropgrad_dist.integrations.transformers import RegularizersCallback, add_regularizers


class ToyClassification(torch.utils.data.Dataset):
    """Token sequences whose label is whether token 7 occurs: made here, nothing downloaded."""

    def __init__(self, size: int, length: int = 16, vocab: int = 64) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.input_ids = torch.randint(0, vocab, (size, length), generator=generator)
        self.labels = (self.input_ids == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": torch.ones_like(self.input_ids[index]),
                "labels": self.labels[index]}


def tiny_bert() -> BertForSequenceClassification:
    """The same tiny BERT in every process (seed 0; no dropout, so every layout computes the same function)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def make_trainer(output_dir: str, *, steps: int = 4, batch_size: int = 8, fsdp2: bool = False,
                 **training: Any) -> Trainer:
    """A Trainer of :func:`tiny_bert` on CPU; ``training`` overrides TrainingArguments (optim, save_steps, ...)."""
    options = dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        accelerator_config={"split_batches": True}, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        use_cpu=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, ddp_find_unused_parameters=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        # BERT's classification loss is a mean over the batch, not a sum over num_items_in_batch:
        # Trainer's token averaging would scale it by the number of processes.
        average_tokens_across_devices=False)
    if fsdp2:
        options.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True,
                                               "transformer_layer_cls_to_wrap": ["BertLayer"]})
    args = TrainingArguments(**{**options, **training})
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=ToyClassification(8 * batch_size))
    # The loss is a per-batch mean: Trainer divides it by the micro-batches of a step (gradient accumulation).
    trainer.loss_is_scaled_for_ga = False
    if fsdp2 and trainer.accelerator.device.type == "cpu" and trainer.accelerator.num_processes > 1:
        # Accelerate shards only on GPU-like devices and otherwise falls back to DDP: shard on CPU too.
        enable_fsdp_on_cpu(trainer.accelerator, FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
        trainer.is_fsdp_enabled = True
    return trainer


def save_results(trainer: Trainer, callback: RegularizersCallback, output_dir: str) -> dict[str, Any] | None:
    """Write the trained parameters and the log history (main process); every rank must call it."""
    # FSDP2 parameters are DTensors: every rank takes part in gathering them.
    trained = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().contiguous()
              for name, p in trained.named_parameters()}
    if not trainer.accelerator.is_main_process:
        return None
    os.makedirs(output_dir, exist_ok=True)
    save_file(params, os.path.join(output_dir, "params.safetensors"))
    regularizers = callback.regularizers
    result = {"mode": regularizers.mode, "world_size": trainer.accelerator.num_processes,
              "step_index": regularizers.step_index if regularizers.dropgrad is not None else None,
              "penalty_steps": regularizers.gnp.penalty_steps if regularizers.gnp is not None else None,
              "log_history": trainer.state.log_history}
    with open(os.path.join(output_dir, "result.json"), "w") as file:
        json.dump(result, file)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/hf_trainer", help="results (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="global batch, split over the processes")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--drop_rate", type=float, default=0.5)
    parser.add_argument("--communication", choices=["dense", "compact"], default="compact")
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 (on CPU processes too)")
    parser.add_argument("--clip_level", type=float, default=0.5, help="clip the global norm to this (0: no clipping)")
    parser.add_argument("--sam", type=float, default=0.0, help="SAM with this rho (0: no SAM)")
    parser.add_argument("--save_steps", type=int, default=0, help="write checkpoint-N/ every this many steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N/ folder to continue")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    trainer = make_trainer(args.output_dir, steps=args.steps, batch_size=args.batch_size, fsdp2=args.fsdp2,
                           gradient_accumulation_steps=args.gradient_accumulation_steps,
                           **(dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else {}))
    callback = add_regularizers(
        trainer, dropgrad=dict(drop_rate=args.drop_rate, seed=3, communication=args.communication),
        clipping=dict(method="norm", clipping_level=args.clip_level) if args.clip_level > 0 else None,
        gnp=dict(alpha=1.0, r=args.sam) if args.sam > 0 else None)
    # max_grad_norm stays at Trainer's default: with clipping=, ours clips instead
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    result = save_results(trainer, callback, args.output_dir)
    if result is not None:
        print(json.dumps(result["log_history"][-2]))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # Trainer leaves the process group up: join gloo's workers before the interpreter finalizes.
        torch.distributed.destroy_process_group()
